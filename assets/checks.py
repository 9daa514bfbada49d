"""Asset checks that guard the data between stages."""


import dagster as dg
import polars as pl

from refine_af_pipeline.filters import blacklisted_word
from refine_af_pipeline.rouge import DEFAULT_THRESHOLD, RougeDeduplicator
from resources import Warehouse

from .instance_pairs import instance_output_pairs
from .instructions import deduplicated_instructions
from .rl_policy import rl_refined_policy


@dg.asset_check(asset=deduplicated_instructions, blocking=True)
def no_kept_pair_above_rouge_threshold(warehouse: Warehouse) -> dg.AssetCheckResult:
    """No two kept instructions (nor a kept one and a seed) have ROUGE-L above the threshold."""
    seeds = warehouse.read_table("seed_pool")["instruction"].to_list()
    df = warehouse.read_table("deduplicated_instructions")
    kept = df.filter(pl.col("decision") == "kept")["instruction"].to_list()
    pool = RougeDeduplicator(seeds)
    worst, pair = 0.0, None
    for instruction in kept:
        score, similar = pool.max_score(instruction)
        if score > worst:
            worst, pair = score, (instruction, similar)
        pool.add(instruction)
    return dg.AssetCheckResult(passed=worst <= DEFAULT_THRESHOLD, metadata={
        "max_rouge_l": worst, "kept": len(kept), "closest_pair": str(pair)})


@dg.asset_check(asset=deduplicated_instructions, blocking=True)
def no_blacklisted_keyword(warehouse: Warehouse) -> dg.AssetCheckResult:
    df = warehouse.read_table("deduplicated_instructions").filter(pl.col("decision") == "kept")
    offenders = [i for i in df["instruction"].to_list() if blacklisted_word(i)]
    return dg.AssetCheckResult(passed=not offenders, metadata={"offenders": offenders[:10], "kept": df.height})


class ParseRateConfig(dg.Config):
    min_parse_rate: float = 0.5


@dg.asset_check(asset=instance_output_pairs)
def instance_parse_rate(config: ParseRateConfig, warehouse: Warehouse) -> dg.AssetCheckResult:
    """Share of generated instances that parse as Input/Output; a low rate means a prompt problem."""
    df = warehouse.read_table("instance_output_pairs")
    rate = float((df["parse_status"] == "ok").mean()) if df.height else 0.0
    return dg.AssetCheckResult(passed=rate >= config.min_parse_rate, severity=dg.AssetCheckSeverity.WARN,
                               metadata={"parse_rate": rate, "threshold": config.min_parse_rate, "instances": df.height})


@dg.asset_check(asset=rl_refined_policy, additional_deps=[instance_output_pairs])
def policy_reward_not_below_base(warehouse: Warehouse) -> dg.AssetCheckResult:
    """Mean reward of the policy's instances vs the base model's, on the instructions both scored.
    Warns rather than fails: a small demo run may not improve, and the data is still usable."""
    base = warehouse.read_table("reward_scores")
    policy = warehouse.read_table("instance_output_pairs")
    if base is None or policy is None:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"reason": "reward_scores or instance_output_pairs not materialized yet"})
    policy_mean = policy.group_by("instruction_id").agg(pl.col("reward").mean().alias("policy"))
    joined = base.select("instruction_id", pl.col("reward").alias("base")).join(policy_mean, on="instruction_id")
    if joined.height == 0:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"reason": "no instruction scored by both"})
    diff = float((joined["policy"] - joined["base"]).mean())
    return dg.AssetCheckResult(passed=diff >= 0, severity=dg.AssetCheckSeverity.WARN, metadata={
        "mean_reward_base": float(joined["base"].mean()), "mean_reward_policy": float(joined["policy"].mean()),
        "mean_difference": diff, "policy_win_share": float((joined["policy"] > joined["base"]).mean()),
        "instructions": joined.height})
