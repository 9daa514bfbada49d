// Opens the Dagster UI's global asset lineage in headless Chromium and saves it as PNGs: the groups
// collapsed (GROUPS_OUT: the branches at a glance), then every group expanded (OUT).
// Called by docs/make_screenshot.sh: node asset_graph_screenshot.js URL OUT [GROUPS_OUT].
const { chromium } = require('playwright-core');

(async () => {
  const [url, out, groupsOut] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
                                          args: ['--no-sandbox', '--disable-gpu'] });
  try {
    const page = await browser.newPage({ viewport: { width: 2200, height: Number(process.env.SHOT_HEIGHT || 2400) }, deviceScaleFactor: 1.2 });
    // The UI's first-visit "join the community" dialog would cover the graph.
    await page.addInitScript(() => localStorage.setItem('communityNux', '1'));
    await page.goto(`${url}/asset-groups`, { waitUntil: 'networkidle', timeout: 120000 });
    await page.getByText('Global asset lineage').waitFor({ timeout: 60000 });
    // More room for the graph: hide the navigation and the asset tree beside the graph.
    await page.getByRole('button', { name: 'Hide navigation' }).click();
    await page.locator('input[placeholder="Jump to…"]').locator('xpath=following::button[1]').click();
    if (groupsOut) {
      await page.waitForTimeout(2000);  // the layout settles
      await page.screenshot({ path: groupsOut });
    }
    // Alt+E is the graph's "Expand all groups"; it needs the focus on the graph.
    await page.mouse.click(1100, 1100);
    await page.keyboard.press('Alt+KeyE');
    await page.waitForLoadState('networkidle');
    await page.waitForTimeout(1500);  // the graph animates its layout after expanding
    // The expanded graph keeps the collapsed graph's zoom, at which it does not fit: zoom out
    // with the graph's own control (the wheel pans). A tall page holds the 28 assets' layout;
    // SHOT_HEIGHT and ZOOM_OUT_STEPS adjust it when the graph grows.
    const zoomOut = page.getByRole('img', { name: 'zoom_out' }).first();
    for (let i = 0; i < Number(process.env.ZOOM_OUT_STEPS || 4); i++) {
      await zoomOut.click();
      await page.waitForTimeout(400);
    }
    await page.waitForTimeout(1500);
    await page.screenshot({ path: out });
  } finally {
    await browser.close();
  }
})().catch((err) => { console.error(err); process.exit(1); });
