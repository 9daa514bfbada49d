"""Reads shared by several stages, so each stage module stays a thin wrapper."""


import json

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback import COMPONENTS, ComponentStats
from refine_af_pipeline.splits import BUCKETS, hash_bucket, in_share
from resources import Warehouse


def kept_instructions(warehouse: Warehouse) -> pl.DataFrame:
    df = warehouse.read_table("deduplicated_instructions")
    if df is None or df.filter(pl.col("decision") == "kept").height == 0:
        raise dg.Failure("deduplicated_instructions has no kept instructions: materialize raw_instructions "
                         "and deduplicated_instructions first (or generate more prompts)")
    return df.filter(pl.col("decision") == "kept").select("instruction_id", "instruction", "is_classification")


def is_held_out(instruction_id: str, share: float) -> bool:
    """Stable split by id hash: the same instruction is held out in every run and every stage, and
    a larger share holds out a superset of a smaller one's ids."""
    return in_share(instruction_id, share)


def effective_heldout_share(instruction_ids: list[str], share: float, min_heldout: int) -> float:
    """`share`, or, when that holds out fewer than min(min_heldout, half the pool) of these ids (a
    small pool: the hash share is only a share on average), the smallest share that holds out
    exactly that many. The caller records it: re-checking with the recorded share after the pool
    has grown adds only new instructions, never one the policy trained on."""
    wanted = min(min_heldout, len(instruction_ids) // 2)
    if sum(is_held_out(i, share) for i in instruction_ids) >= wanted:
        return share
    return (sorted(hash_bucket(i) for i in instruction_ids)[wanted - 1] + 1) / BUCKETS


def split_held_out(kept: pl.DataFrame, share: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(instructions RL trains on, held-out instructions) by the stable id hash."""
    held = kept["instruction_id"].map_elements(lambda i: is_held_out(i, share), return_dtype=pl.Boolean)
    return kept.filter(~held), kept.filter(held)


def base_component_stats(warehouse: Warehouse) -> ComponentStats:
    df = warehouse.read_table("reward_scores")
    if df is None:
        raise dg.Failure("reward_scores is missing: materialize it first (its base-model scores standardise the reward)")
    stats = ComponentStats.from_rows(df.filter(pl.col("gate_reason").is_null()).select(COMPONENTS).to_dicts())
    # Weights fitted to human ratings belong to this standardisation: every later reward uses them.
    if "weights_source" in df.columns and df.height and df["weights_source"][0].startswith("calibration"):
        stats.weights = json.loads(df["weights"][0])
        stats.bias = float(df["bias"][0])
    return stats


def latest_artifact(warehouse: Warehouse, table: str) -> str:
    df = warehouse.read_table(table)
    if df is None or df.height == 0:
        raise dg.Failure(f"{table} has no training log: materialize it first")
    return df["adapter_path"][-1]


def subset(df: pl.DataFrame, limit: int, seed: int) -> pl.DataFrame:
    """A reproducible sample of at most `limit` rows (0 = all)."""
    if limit <= 0 or df.height <= limit:
        return df
    return df.sample(n=limit, seed=seed).sort("instruction_id")
