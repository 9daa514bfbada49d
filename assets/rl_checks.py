"""The RL stage's measured effect: base model vs RL-refined policy on held-out instructions."""


import json
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback import COMPONENTS
from refine_af_pipeline.heldout_comparison import HeldoutCheckSettings, generate_both, per_instruction_rows, summarise
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse

from .metadata import metadata_table, peak_memory
from .rl_policy import rl_refined_policy
from .shared import base_component_stats, kept_instructions, latest_artifact, split_held_out

CHECK_STAGE = "policy_beats_base_on_heldout"  # its name in stage_batch_sizes
PASS_RULE = "lower bound of the bootstrap 95% CI of the mean paired reward difference (policy - base) > 0"


class HeldoutComparisonConfig(dg.Config, HeldoutCheckSettings):
    """Run config of the held-out check: the fields of HeldoutCheckSettings (refine_af_pipeline/heldout_comparison.py)."""


def _warn(**metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, metadata=metadata)


@dg.asset_check(asset=rl_refined_policy, additional_deps=["reward_scores", "deduplicated_instructions"], pool="gpu")
def policy_beats_base_on_heldout(context: dg.AssetCheckExecutionContext, config: HeldoutComparisonConfig,
                                 warehouse: Warehouse, language_model: LanguageModelResource,
                                 feedback_scorer: FeedbackScorerResource) -> dg.AssetCheckResult:
    """On the kept instructions RL never trained on (the same hash split rl_refined_policy used),
    the base model and the RL-refined policy each write `samples_per_instruction` instances with the
    same prompts, sampling parameters and seeds; the feedback scorer (standardised with the base
    model's reward_scores) scores both. Reports the mean paired reward difference with a bootstrap
    95% CI over instructions, the shares of instructions the policy wins, ties and loses, and the
    paired difference of each component; one row per instruction goes to the DuckDB table
    rl_heldout_comparison. Passes when the CI's lower bound is above 0, otherwise warns (never
    fails the run: a short demo run may not improve and its data is still usable)."""
    started = time.monotonic()
    log = warehouse.read_table("rl_refined_policy")
    if log is None or log.height == 0:
        return _warn(reason="rl_refined_policy has no training log yet")
    # The share rl_refined_policy recorded (older logs: its configured one).
    heldout_share = (float(log["heldout_share"][-1]) if "heldout_share" in log.columns
                     else json.loads(log["settings"][-1]).get("heldout_share", 0.0))
    _, heldout = split_held_out(kept_instructions(warehouse), heldout_share)
    if config.max_instructions > 0:
        heldout = heldout.head(config.max_instructions)
    if heldout.height == 0:
        return _warn(reason=f"no held-out instructions (heldout_share {heldout_share}); grow the pool or raise it",
                     pass_rule=PASS_RULE)
    adapter = latest_artifact(warehouse, "rl_refined_policy")
    # One copy of the weights: the policy is the base model with its adapter on, the base model (also
    # the judge, exactly as in reward_scores and the RL reward) the same with it off.
    models, tokenizer, source, device = language_model.load_variants({"base": None, "policy": adapter})
    base, policy = models["base"], models["policy"]
    scorer = feedback_scorer.build(base, tokenizer, device, base_component_stats(warehouse),
                                   language_model.scoring_batch_size, judge_id=source.model_id)
    params = config.sampling_params()
    k = config.samples_per_instruction

    def progress(label, done, total):
        context.log.info(f"held-out comparison/{label}: batch {done}/{total}, {time.monotonic() - started:.0f} s elapsed")

    context.log.info(f"held-out comparison on {heldout.height} instructions x {k} samples, {source.model_id} on {device}")
    base_rows, policy_rows = generate_both(base, policy, tokenizer, scorer, heldout["instruction"].to_list(), params, k,
                                           language_model.generation_batch_size(CHECK_STAGE), config.seed, progress)
    rows = per_instruction_rows(heldout["instruction_id"].to_list(), heldout["instruction"].to_list(),
                                base_rows, policy_rows, k)
    summary = summarise(rows, config.bootstrap_resamples, config.seed)
    c = summary.comparison
    df = pl.DataFrame(rows, schema_overrides={f"{m}_{n}": pl.Float64 for m in ("base", "policy") for n in COMPONENTS})
    df = df.with_columns(pl.lit(adapter).alias("policy_adapter"), pl.lit(source.model_id).alias("model_id"),
                         pl.lit(json.dumps(params.as_dict())).alias("sampling_params"),
                         pl.lit(json.dumps(scorer.versions())).alias("scorers"), pl.lit(context.run.run_id).alias("run_id"))
    warehouse.write_table("rl_heldout_comparison", df)
    passed = c.ci_low > 0 and c.n >= config.min_instructions
    return dg.AssetCheckResult(passed=bool(passed), severity=dg.AssetCheckSeverity.WARN, metadata={
        "heldout_instructions": c.n,
        "samples_per_instruction": k,
        "mean_reward_base": summary.mean_reward_base,
        "mean_reward_policy": summary.mean_reward_policy,
        "mean_difference": c.mean_difference,
        "ci95_low": c.ci_low,
        "ci95_high": c.ci_high,
        "win_share": c.win_share,
        "tie_share": c.tie_share,
        "loss_share": c.loss_share,
        "wins_ties_losses": f"{c.wins}/{c.ties}/{c.losses}",
        **{f"difference_{name}": value for name, value in summary.component_differences.items()},
        "gate_failure_share_base": summary.gate_failure_share_base,
        "gate_failure_share_policy": summary.gate_failure_share_policy,
        "repeat_share_base": summary.repeat_share_base,
        "repeat_share_policy": summary.repeat_share_policy,
        "pass_rule": PASS_RULE + (f"; and at least {config.min_instructions} instructions" if config.min_instructions else ""),
        "per_instruction": metadata_table(df.select(
            "instruction", "base_reward", "policy_reward", "reward_difference", "outcome")),
        "table": "rl_heldout_comparison",
        "check_seconds": round(time.monotonic() - started, 1),
        **peak_memory(device),
    })
