#!/usr/bin/env bash
# Screenshot of the asset graph as the Dagster UI draws it: docs/asset_graph.png.
#
# Starts dagster-webserver on loopback (a free port) for this repository's code location, waits
# until the location has loaded, opens the global asset lineage in headless Chromium (Debian's
# package, installed here if missing) driven by playwright-core from npm (installed into a cache
# folder if missing; it downloads no browser of its own), expands every group and saves the page.
# Uses $DAGSTER_HOME when set (`make screenshot` sets .dagster_home: after `make run` the graph
# shows that instance's materializations), otherwise a throw-away instance.
#   bash docs/make_screenshot.sh [expanded.png] [groups.png]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/asset_graph.png}"
GROUPS_OUT="${2:-docs/asset_groups.png}"
VENV_BIN=.venv/bin

if ! command -v chromium >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
NODE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/refine-af-pipeline/screenshot-node"
if [ ! -d "$NODE_DIR/node_modules/playwright-core" ]; then
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
  mkdir -p "$NODE_DIR"
  npm install --silent --prefix "$NODE_DIR" playwright-core@1.65.1 >/dev/null
fi

HOME_DIR="${DAGSTER_HOME:-$(mktemp -d)}"
mkdir -p "$HOME_DIR"
[ -f "$HOME_DIR/dagster.yaml" ] || cp dagster.yaml "$HOME_DIR/dagster.yaml"
export DAGSTER_HOME="$HOME_DIR" HF_HUB_OFFLINE=1
PORT="$($VENV_BIN/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"
LOG="$(mktemp)"

setsid "$VENV_BIN/dagster-webserver" -w workspace.yaml -h 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!
# The webserver and the code server it starts share one process group: end both.
trap 'kill -TERM -- -"$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT

# Ready when the code location reports LOADED (not just when /server_info answers).
QUERY='{"query":"{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"}'
for _ in $(seq 1 300); do
  if curl -sf -H 'Content-Type: application/json' -d "$QUERY" "$URL/graphql" 2>/dev/null | grep -q '"LOADED"'; then
    break
  fi
  sleep 1
done
curl -sf -H 'Content-Type: application/json' -d "$QUERY" "$URL/graphql" | grep -q '"LOADED"' \
  || { echo "code location did not load; webserver log:"; tail -50 "$LOG"; exit 1; }

NODE_PATH="$NODE_DIR/node_modules" CHROMIUM="$(command -v chromium)" \
  node docs/asset_graph_screenshot.js "$URL" "$OUT" "$GROUPS_OUT"
# The collapsed graph is small on the tall page: trim the empty margin around it.
"$VENV_BIN/python" - "$GROUPS_OUT" <<'PY'
import sys
from PIL import Image, ImageChops

path = sys.argv[1]
image = Image.open(path).convert("RGB")
# The graph's area: below the header, right of the navigation, left of the zoom controls.
left, top, right = image.width // 30, image.height // 20, image.width - image.width // 20
area = image.crop((left, top, right, image.height))
background = Image.new("RGB", area.size, area.getpixel((area.width // 2, area.height - 2)))
# The group boxes' text and borders; the grid's dots and the edges are fainter.
ink = ImageChops.difference(area, background).convert("L").point(lambda v: 255 if v > 60 else 0)
box = ink.getbbox()
if box:
    pad = 60
    image.crop((left + max(box[0] - pad, 0), top + max(box[1] - pad, 0), left + min(box[2] + pad, area.width),
                top + min(box[3] + pad, area.height))).save(path)
PY
echo "wrote $OUT and $GROUPS_OUT"
