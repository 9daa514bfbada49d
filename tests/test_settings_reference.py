"""docs/settings.md is what refine_af_pipeline/settings_reference.py writes, and what it writes is
faithful to the settings classes and the profile files."""

import re

import pytest
import yaml

from refine_af_pipeline import settings_reference as ref

pytestmark = pytest.mark.unit

REGENERATE = f"regenerate it with `{ref.COMMAND}` and commit docs/settings.md"
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


@pytest.fixture(scope="module")
def page() -> str:
    return ref.render()


@pytest.fixture(scope="module")
def sections() -> dict[str, ref.Section]:
    stages, resources, _, _ = ref.build_sections()
    return {s.name: s for s in [*stages, *resources]}


def rows_by_field(section: ref.Section) -> dict[str, ref.Row]:
    return {row.field.strip("`"): row for row in section.rows}


def test_committed_page_is_what_the_script_writes(page):
    committed = ref.OUTPUT.read_text() if ref.OUTPUT.is_file() else ""
    difference = ref.first_difference(page, committed)
    assert difference is None, f"docs/settings.md is out of date ({difference}): {REGENERATE}"


def test_every_rl_field_is_listed_with_its_default(sections):
    from assets.rl_policy import RLConfig

    rows = rows_by_field(sections["rl_refined_policy"])
    assert list(rows) == list(RLConfig.model_fields)
    for name, info in RLConfig.model_fields.items():
        assert rows[name].default == f"`{ref.value_text(info.default)}`", name
    assert rows["use_vllm"].default == "`false`"
    assert rows["vllm_gpu_memory_utilization"].type == "float in [0, 1]"
    assert rows["max_steps"].type == "int > 0"


def test_the_sft_section_is_expanded_into_dotted_rows(sections):
    from refine_af_pipeline.training.sft import SFTSettings

    rows = rows_by_field(sections["sft_training_pairs"])
    for name, info in SFTSettings.model_fields.items():
        assert rows[f"sft.{name}"].default == f"`{ref.value_text(info.default)}`", name
        assert rows[f"sft.{name}"].description == info.description
    assert "sft" not in rows


def _leaves(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("profile", ["demo", "experiment"])
def test_every_value_a_profile_sets_is_in_its_column(sections, profile):
    column = list(ref.profile_configs()).index(profile)
    config = yaml.safe_load((ref.ROOT / "configs" / f"{profile}.yaml").read_text())
    checked = 0
    for kind in ("ops", "resources"):
        for name, section in (config.get(kind) or {}).items():
            rows = rows_by_field(sections[name])
            for field, value in _leaves(section["config"]):
                assert rows[field].profile_values[column] == f"`{ref.value_text(value)}`", (name, field)
                checked += 1
    assert checked > 10
    # A field the profile leaves alone is blank in its column.
    assert rows_by_field(sections["rl_refined_policy"])["beta"].profile_values[column] == ""


def test_the_audit_model_default_is_the_audit_judge_not_the_base_model(sections):
    from refine_af_pipeline.llm.models import EMBEDDED, EMBEDDED_GEMMA

    assert rows_by_field(sections["audit_model"])["model"].default == f"`{EMBEDDED_GEMMA}`"
    assert rows_by_field(sections["language_model"])["model"].default == f"`{EMBEDDED}`"
    assert rows_by_field(sections["warehouse"])["database"].default == "`<data dir>/refine_af.duckdb`"


def test_the_page_does_not_depend_on_the_environment(page, monkeypatch):
    monkeypatch.setenv("REFINE_AF_MODEL", "/somewhere/else")
    monkeypatch.setenv("REFINE_AF_AUDIT_BACKEND", "openai")
    monkeypatch.setenv("REFINE_AF_DATA_DIR", "/elsewhere")
    assert ref.render() == page


def test_every_table_row_has_as_many_cells_as_its_header(page):
    width = None
    for number, line in enumerate(page.splitlines(), start=1):
        if not line.startswith("|"):
            width = None
            continue
        cells = len(UNESCAPED_PIPE.split(line)) - 2
        width = width or cells
        assert cells == width, f"line {number} has {cells} cells, its table {width}: an unescaped `|`?"


def test_a_profile_key_no_settings_class_has_stops_the_script(monkeypatch):
    monkeypatch.setattr(
        ref,
        "profile_configs",
        lambda: {"demo": {"ops": {"rl_refined_policy": {"config": {"max_step": 3}}}}},
    )
    with pytest.raises(ref.SettingsReferenceError, match="max_step"):
        ref.build_sections()


def test_check_names_the_first_differing_line(page, tmp_path, capsys):
    lines = page.splitlines()
    lines[4] = "edited by hand"
    stale = tmp_path / "settings.md"
    stale.write_text("\n".join(lines) + "\n")
    assert ref.main(["--check", "--output", str(stale)]) == 1
    message = capsys.readouterr().err
    assert "line 5" in message and "edited by hand" in message and ref.COMMAND in message
    stale.write_text(page)
    assert ref.main(["--check", "--output", str(stale)]) == 0


def test_every_link_into_the_page_names_one_of_its_sections(sections):
    links = {
        (doc.name, anchor)
        for doc in (ref.ROOT / "docs").glob("*.md")
        for anchor in re.findall(r"settings\.md#([\w-]+)", doc.read_text())
    }
    assert links, "docs/stages.md links its settings to docs/settings.md"
    assert [link for link in sorted(links) if link[1] not in sections] == []
