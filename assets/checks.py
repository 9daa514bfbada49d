"""Asset checks that guard the data between stages (the RL held-out check is in rl_heldout.py, the
evaluation's in evaluation.py: each is computed by its asset)."""

import dagster as dg
import polars as pl

from refine_af_pipeline.instructions.filters import blacklisted_word
from refine_af_pipeline.instructions.instances import ParseRateSettings
from refine_af_pipeline.instructions.rouge import DEFAULT_THRESHOLD, RougeDeduplicator
from resources import Warehouse

from .instance_pairs import INSTANCE_PAIRS, instance_output_pairs
from .instructions import DEDUP, POOL, current_pool, rows_of_pool
from .seed_pool import SEED_POOL


@dg.asset_check(asset=DEDUP, additional_deps=[SEED_POOL, POOL], blocking=True)
def no_kept_pair_above_rouge_threshold(warehouse: Warehouse) -> dg.AssetCheckResult:
    """No two kept instructions of the run's pool (nor a kept one and a seed) have ROUGE-L above the
    threshold; pools are de-duplicated apart."""
    seeds = warehouse.read_table(SEED_POOL)["instruction"].to_list()
    kept = _kept_instructions(warehouse)
    pool = RougeDeduplicator(seeds)
    worst, pair = 0.0, None
    for instruction in kept:
        score, similar = pool.max_score(instruction)
        if score > worst:
            worst, pair = score, (instruction, similar)
        pool.add(instruction)
    return dg.AssetCheckResult(
        passed=worst <= DEFAULT_THRESHOLD, metadata={"max_rouge_l": worst, "kept": len(kept), "closest_pair": str(pair)}
    )


@dg.asset_check(asset=DEDUP, additional_deps=[POOL], blocking=True)
def no_blacklisted_keyword(warehouse: Warehouse) -> dg.AssetCheckResult:
    kept = _kept_instructions(warehouse)
    offenders = [i for i in kept if blacklisted_word(i)]
    return dg.AssetCheckResult(passed=not offenders, metadata={"offenders": offenders[:10], "kept": len(kept)})


def _kept_instructions(warehouse: Warehouse) -> list[str]:
    # No table yet (a run that had nothing to decide writes none): nothing kept, nothing to flag.
    df = rows_of_pool(warehouse, DEDUP, current_pool(warehouse))
    return [] if df is None else df.filter(pl.col("decision") == "kept")["instruction"].to_list()


class ParseRateConfig(dg.Config, ParseRateSettings):
    """Run config of the parse-rate check: the fields of ParseRateSettings
    (refine_af_pipeline/instructions/instances.py)."""


@dg.asset_check(asset=instance_output_pairs)
def instance_parse_rate(config: ParseRateConfig, warehouse: Warehouse) -> dg.AssetCheckResult:
    """Share of generated instances that parse as Input/Output; a low rate means a prompt problem."""
    df = warehouse.read_table(INSTANCE_PAIRS)
    rate = float((df["parse_status"] == "ok").mean()) if df.height else 0.0
    return dg.AssetCheckResult(
        passed=rate >= config.min_parse_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"parse_rate": rate, "threshold": config.min_parse_rate, "instances": df.height},
    )
