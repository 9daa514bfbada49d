"""Dataset exports: every format reads back as the rows that were written; a crash mid-export
leaves no half export under the final name."""

import json

import polars as pl
import pytest

from refine_af_pipeline import exports
from refine_af_pipeline.exports import EXPORT_FIELDS, export_rows, read_dataset_exports, write_dataset_exports

pytestmark = pytest.mark.unit


def _pairs(policy_adapter):
    """An instance-pairs table as the pipeline writes it (extra columns, a dropped row)."""
    return pl.DataFrame(
        {
            "instance_id": ["i2-0", "i1-0", "i3-0"],
            "instruction_id": ["i2", "i1", "i3"],
            "instruction": ["Name a fruit that is yellow", "Translate \u201cbonjour\u201d to English", "Say nothing"],
            "input": ["", "bonjour", "x"],
            "output": ["banana", "hello\nor hi", "x"],
            "reward": [0.5, -1.25, None],
            "keep": [True, True, False],
            "filter_reason": [None, None, "output_equals_input"],
            "generation": ["Input: ...", "Input: ...", "Input: ..."],
            "policy_adapter": [policy_adapter] * 3,
            "model_id": ["tiny-llama"] * 3,
            "sampling_params": [json.dumps({"temperature": 0.7})] * 3,
            "scorers": [json.dumps({"preference": "llm-judge"})] * 3,
            "run_id": ["run-1"] * 3,
        },
        schema_overrides={"policy_adapter": pl.Utf8 if policy_adapter else pl.Null},
    )


@pytest.mark.parametrize("dataset,adapter", [("refine_af", "/artifacts/rl/adapter"), ("self_instruct", None)])
def test_every_format_round_trips_the_kept_rows(tmp_path, dataset, adapter):
    rows = export_rows(_pairs(adapter), dataset)
    assert rows.columns == list(EXPORT_FIELDS)
    assert rows["instance_id"].to_list() == ["i1-0", "i2-0"]  # kept rows only, in a stable order
    assert rows.schema["policy_adapter"] == pl.Utf8
    paths = write_dataset_exports(rows, tmp_path / dataset)
    assert set(paths) == {"alpaca_json", "jsonl", "parquet", "hf_dataset"}
    assert all(p.exists() for p in paths.values())
    expected = rows.to_dicts()
    assert expected[0]["policy_adapter"] == adapter and expected[0]["dataset"] == dataset
    for fmt, records in read_dataset_exports(tmp_path / dataset).items():
        assert records == expected, fmt
    # Alpaca layout: a list of objects whose first keys are instruction, input, output.
    alpaca = json.loads(paths["alpaca_json"].read_text(encoding="utf-8"))
    assert list(alpaca[0])[:3] == ["instruction", "input", "output"]
    assert not (tmp_path / f"{dataset}.partial").exists()


def test_a_crash_mid_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    target = tmp_path / "refine_af"
    first = export_rows(_pairs("/a"), "refine_af")
    write_dataset_exports(first, target)

    def crash(rows):
        raise OSError("disk full")

    monkeypatch.setattr(exports, "_hf_dataset", crash)
    with pytest.raises(OSError, match="disk full"):
        write_dataset_exports(first.head(1), target)
    assert read_dataset_exports(target)["jsonl"] == first.to_dicts()  # the earlier export, untouched
    with pytest.raises(OSError):
        write_dataset_exports(first.head(1), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # never a half export under the final name
    monkeypatch.undo()
    write_dataset_exports(first.head(1), target)  # a retry replaces the export and the partial folder
    assert read_dataset_exports(target)["parquet"] == first.head(1).to_dicts()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.partial", "refine_af"]
