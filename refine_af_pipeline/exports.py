"""The final instruction data written out for use outside the pipeline: Alpaca-format JSON, JSONL,
parquet and a Hugging Face `datasets` directory, all with the same rows and provenance columns.

A dataset's folder appears whole or not at all: every file is written into a sibling `.partial`
folder that is renamed into place at the end (a rename within one filesystem is atomic), so a crash
leaves at most a `.partial` folder, never a half export under the final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

ALPACA_FIELDS = ("instruction", "input", "output")
# Which run, model, adapter, sampling and judges made each row (policy_adapter is null for the
# Self-Instruct baseline, whose instances the base model wrote).
PROVENANCE_FIELDS = (
    "dataset",
    "instance_id",
    "instruction_id",
    "reward",
    "policy_adapter",
    "model_id",
    "backend",
    "engine_version",
    "sampling_params",
    "scorers",
    "run_id",
)
EXPORT_FIELDS = ALPACA_FIELDS + PROVENANCE_FIELDS
_TEXT_FIELDS = [f for f in EXPORT_FIELDS if f != "reward"]

# File (or folder) name of each format inside a dataset's export folder.
FORMAT_FILES = {
    "alpaca_json": "alpaca.json",
    "jsonl": "data.jsonl",
    "parquet": "data.parquet",
    "hf_dataset": "hf_dataset",
}


def export_rows(pairs: pl.DataFrame, dataset: str) -> pl.DataFrame:
    """The kept instances of an instance-pairs table in the export layout, with fixed column types
    (an all-null column such as the baseline's policy_adapter would otherwise have no type). Of a
    table with replicates, the first replicate: one dataset, not several draws of it."""
    kept = pairs.filter(pl.col("keep")).with_columns(pl.lit(dataset).alias("dataset"))
    if "replicate" in kept.columns:
        kept = kept.filter(pl.col("replicate").fill_null(0) == 0)
    # A table written before the backend columns existed exports them as null.
    return (
        kept.select(
            *[(pl.col(f) if f in kept.columns else pl.lit(None)).cast(pl.Utf8).alias(f) for f in _TEXT_FIELDS],
            # TeaMs-RL's pairs have no feedback reward (the expert's answers are not scored).
            (pl.col("reward") if "reward" in kept.columns else pl.lit(None)).cast(pl.Float64).alias("reward"),
        )
        .select(EXPORT_FIELDS)
        .sort("instance_id")
    )


def write_dataset_exports(rows: pl.DataFrame, target: Path) -> dict[str, Path]:
    """Write `rows` (export_rows' layout) in every format into the folder `target`; replaces an
    earlier export there. Returns format -> path."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a crashed attempt
    partial.mkdir(parents=True)
    records = rows.to_dicts()
    with open(partial / FORMAT_FILES["alpaca_json"], "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    with open(partial / FORMAT_FILES["jsonl"], "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    rows.write_parquet(partial / FORMAT_FILES["parquet"])
    _hf_dataset(rows).save_to_disk(str(partial / FORMAT_FILES["hf_dataset"]))
    _swap_into_place(partial, target)
    return {fmt: target / name for fmt, name in FORMAT_FILES.items()}


def _hf_dataset(rows: pl.DataFrame):
    from datasets import Dataset, Features, Value

    features = Features({f: Value("float64" if f == "reward" else "string") for f in rows.columns})
    return Dataset.from_dict(rows.to_dict(as_series=False), features=features)


def _swap_into_place(partial: Path, target: Path) -> None:
    if not target.exists():
        partial.rename(target)
        return
    # Re-executing the same run: the old export stays complete until the new one is in place.
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    partial.rename(target)
    shutil.rmtree(old)


def read_dataset_exports(target: Path) -> dict[str, list[dict]]:
    """Each format of an export folder read back as a list of records (for checks and tests)."""
    from datasets import load_from_disk

    target = Path(target)
    with open(target / FORMAT_FILES["jsonl"], encoding="utf-8") as f:
        jsonl = [json.loads(line) for line in f if line.strip()]
    return {
        "alpaca_json": json.loads((target / FORMAT_FILES["alpaca_json"]).read_text(encoding="utf-8")),
        "jsonl": jsonl,
        "parquet": pl.read_parquet(target / FORMAT_FILES["parquet"]).to_dicts(),
        "hf_dataset": load_from_disk(str(target / FORMAT_FILES["hf_dataset"])).to_list(),
    }


class ExportSettings(BaseModel):
    """Settings of `instruction_dataset_exports`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    include_self_instruct: bool = Field(True, description="also export the baseline's data (dataset self_instruct)")
