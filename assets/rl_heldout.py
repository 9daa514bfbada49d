"""The RL stage's measured effect: base model vs RL-refined policy on held-out instructions, as an
asset (its per-instruction table) carrying the check that the policy beats the base."""

import json
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.evaluation.conclusion import paired_conclusion
from refine_af_pipeline.evaluation.heldout import (
    HeldoutCheckSettings,
    add_audit,
    generate_both,
    per_instruction_rows,
    summarise,
)
from refine_af_pipeline.feedback.audit import InstructionPMIAudit
from refine_af_pipeline.feedback.scores import COMPONENTS
from refine_af_pipeline.llm.query_count import QueryCounter
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse

from . import groups
from .columns import declare
from .instructions import current_pool
from .metadata import metadata_table, peak_memory, table_metadata
from .reward_model import REWARD_MODEL
from .rl_policy import RL_POLICY
from .shared import (
    POOL_DEPS,
    STANDARDISATION,
    adapter_folder,
    base_component_stats,
    kept_instructions,
    latest_rows,
    learned_reward_dir,
    provenance_columns,
    require_pool,
    split_held_out,
)

HELDOUT = "rl_heldout_comparison"
COLUMNS = declare(
    {
        HELDOUT: {
            "samples": "instances each model wrote for the held-out instruction",
            "base_reward": "mean combined reward of the base model's instances for the instruction",
            "policy_reward": "mean combined reward of the RL policy's instances for the instruction",
            "reward_difference": "policy_reward - base_reward",
            "outcome": "win, tie (within 1e-3) or loss of the policy on this instruction",
            "base_gate_failures": "base model instances the instance gate rejected",
            "policy_gate_failures": "policy instances the instance gate rejected",
            "base_passed": "base model instances that passed the instance gate",
            "policy_passed": "RL policy instances that passed the instance gate",
            "base_passed_reward_sum": "sum of the combined reward over the base model's gate-passing instances",
            "policy_passed_reward_sum": "sum of the combined reward over the RL policy's gate-passing instances",
            "base_repeat_share": "mean repeated-3-gram share of the base model's instances (0-1)",
            "policy_repeat_share": "mean repeated-3-gram share of the policy's instances (0-1)",
            **{f"base_{c}": f"mean raw {c} of the base model's instances" for c in COMPONENTS},
            **{f"policy_{c}": f"mean raw {c} of the policy's instances" for c in COMPONENTS},
            "base_audit": "mean audit score of the base model's gate-passing instances for the instruction",
            "policy_audit": "mean audit score of the RL policy's gate-passing instances for the instruction",
            "audit_difference": "policy_audit - base_audit (null when a side has no gate-passing instance)",
            "base_example": "the first instance the base model wrote",
            "policy_example": "the first instance the policy wrote",
            "model_id": "the base model (also the judge), by the name it was served as",
            "policy_served_model": "the RL policy as it was served",
        }
    }
)
CHECK_NAME = "policy_beats_base_on_heldout"
PASS_RULE = "lower bound of the bootstrap 95% CI of the mean paired reward difference (policy - base) > 0"
_EMPTY_SCHEMA = {
    "instruction_id": pl.Utf8,
    "instruction": pl.Utf8,
    "base_reward": pl.Float64,
    "policy_reward": pl.Float64,
    "reward_difference": pl.Float64,
    "outcome": pl.Utf8,
    "llm_queries": pl.Utf8,
    "run_id": pl.Utf8,
}


class HeldoutComparisonConfig(dg.Config, HeldoutCheckSettings):
    """Run config of `rl_heldout_comparison`: the fields of HeldoutCheckSettings
    (refine_af_pipeline/evaluation/heldout.py)."""


@dg.asset(
    group_name=groups.REFINE_AF,
    kinds={"duckdb", "pytorch"},
    pool="gpu",
    deps=[RL_POLICY, STANDARDISATION, *POOL_DEPS, REWARD_MODEL],
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=HELDOUT,
            description=(
                "Warns (never fails the run: a short demo run may not improve and its data is still usable) "
                "unless the " + PASS_RULE + "."
            ),
        )
    ],
)
def rl_heldout_comparison(
    context: dg.AssetExecutionContext,
    config: HeldoutComparisonConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    feedback_scorer: FeedbackScorerResource,
    audit_model: LanguageModelResource,
) -> dg.MaterializeResult:
    """On the kept instructions RL never trained on (the hash split rl_refined_policy recorded),
    the base model and the RL-refined policy each write `samples_per_instruction` instances with the
    same prompts, sampling parameters and seeds; the feedback scorer (the base model, standardised
    by reward_standardisation) scores both. One row per instruction; the metadata and the check
    report the mean paired reward difference with a bootstrap 95% CI over instructions, the shares
    of instructions the policy wins, ties and loses, and the paired difference of each component."""
    started = time.monotonic()
    trained, heldout_share, heldout = _heldout_instructions(context, config, warehouse)
    if heldout.height == 0:
        return _no_heldout_result(context, warehouse, heldout_share)
    adapter = adapter_folder(warehouse, RL_POLICY, trained)
    # One copy of the weights: the policy is the base model with its adapter on, the base model (also
    # the judge, exactly as in reward_scores and the RL reward) the same with it off.
    models = language_model.open_models({"base": None, "policy": adapter})
    queries = QueryCounter()
    base = queries.wrap(models["base"], "generator", scoring_role="judge")
    policy = queries.wrap(models["policy"], "generator")
    device = language_model.resolved_device()
    scorer = feedback_scorer.build(
        base,
        device,
        base_component_stats(warehouse),
        language_model.scoring_batch_size,
        learned_reward_dir(warehouse, feedback_scorer),
    )
    # The audit judge reads both models' gate-passing outputs: weights the policy never trained
    # against. Opened before the generation, so a backend that cannot score fails at once.
    audit = InstructionPMIAudit(
        queries.wrap(audit_model.open_models({"audit": None})["audit"], "audit"), audit_model.scoring_batch_size
    )
    params = config.sampling_params()
    rows = _generate_and_score(
        context, config, language_model, base, policy, scorer, audit, heldout, params, device, started
    )
    summary = summarise(rows, scorer.gate.reward, config.bootstrap_resamples, config.seed)
    df = _comparison_table(context, rows, adapter, base, policy, params, scorer, queries)
    warehouse.write_table(HELDOUT, df)
    conclusion = _conclusion(summary, config)
    if not conclusion.passed:
        context.log.warning(f"{CHECK_NAME}: {conclusion.description}")
    figures = _figures(summary, df, config, scorer.gate.reward, audit.version)
    return dg.MaterializeResult(
        metadata=_heldout_metadata(df, figures, adapter, started, queries, device),
        check_results=[_heldout_check(conclusion, figures)],
    )


def _heldout_instructions(
    context: dg.AssetExecutionContext, config: HeldoutComparisonConfig, warehouse: Warehouse
) -> tuple:
    """The latest rl_refined_policy run's rows, its held-out share and the held-out instructions it left."""
    pool = current_pool(warehouse)
    for upstream in (RL_POLICY, STANDARDISATION):  # the policy and the reward of the pool it splits
        require_pool(warehouse, upstream, pool)
    # The share and the adapter of the same run of rl_refined_policy, from its table.
    trained = latest_rows(warehouse, RL_POLICY, ("heldout_share",))
    heldout_share = float(trained[1]["heldout_share"].drop_nulls()[-1])
    _, heldout = split_held_out(kept_instructions(warehouse, context), heldout_share)
    if config.max_instructions > 0:
        heldout = heldout.head(config.max_instructions)
    return trained, heldout_share, heldout


def _generate_and_score(
    context: dg.AssetExecutionContext,
    config: HeldoutComparisonConfig,
    language_model: LanguageModelResource,
    base,
    policy,
    scorer,
    audit: InstructionPMIAudit,
    heldout: pl.DataFrame,
    params,
    device,
    started: float,
) -> list[dict]:
    """Both models write k instances per held-out instruction, scored and audited: one row per instruction."""
    k = config.samples_per_instruction

    def progress(label, done, total):
        context.log.info(
            f"held-out comparison/{label}: batch {done}/{total}, {time.monotonic() - started:.0f} s elapsed"
        )

    context.log.info(
        f"held-out comparison on {heldout.height} instructions x {k} samples, {base.provenance.served_model} "
        f"({base.provenance.backend}) on {device}"
    )
    base_rows, policy_rows = generate_both(
        base,
        policy,
        scorer,
        heldout["instruction"].to_list(),
        params,
        k,
        language_model.generation_batch_size(config.generation_batch_size),
        config.seed,
        progress,
        heldout["is_classification"].to_list(),
    )
    for scored in (base_rows, policy_rows):
        add_audit(scored, audit)
    return per_instruction_rows(
        heldout["instruction_id"].to_list(), heldout["instruction"].to_list(), base_rows, policy_rows, k
    )


def _comparison_table(
    context: dg.AssetExecutionContext, rows: list[dict], adapter: str, base, policy, params, scorer, queries
) -> pl.DataFrame:
    """The asset's table: the per-instruction rows with the models, settings, scorers and this run's queries."""
    return pl.DataFrame(rows, schema_overrides=_ROW_TYPES).with_columns(
        pl.lit(adapter).alias("policy_adapter"),
        *(pl.lit(v).alias(k) for k, v in provenance_columns(base.provenance).items()),
        pl.lit(policy.provenance.served_model).alias("policy_served_model"),
        pl.lit(json.dumps(params.as_dict())).alias("sampling_params"),
        pl.lit(json.dumps(scorer.versions())).alias("scorers"),
        # This run's model queries, for the query ledger.
        pl.lit(queries.as_json()).alias("llm_queries"),
        pl.lit(context.run_id).alias("run_id"),
    )


def _conclusion(summary, config: HeldoutComparisonConfig):
    """The check's answer: the paired reward difference's CI over the held-out instructions."""
    return paired_conclusion(
        "the RL policy beats the base model on held-out instructions",
        summary.comparison,
        unit="standardised reward",
        min_n=config.min_instructions,
        n_unit="instructions",
    )


def _heldout_metadata(
    df: pl.DataFrame, figures: dict, adapter: str, started: float, queries: QueryCounter, device
) -> dict:
    """The asset's metadata: the table, the comparison's figures, the adapter, the time and the queries."""
    return {
        **table_metadata(df, ["instruction", "base_reward", "policy_reward", "outcome"], table=HELDOUT),
        **figures,
        "policy_adapter": dg.MetadataValue.path(adapter),
        "comparison_seconds": round(time.monotonic() - started, 1),
        "llm_queries": queries.as_json(),
        **peak_memory(device),
    }


def _heldout_check(conclusion, figures: dict) -> dg.AssetCheckResult:
    """The policy_beats_base_on_heldout check: a warning only, with the figures and the conclusion."""
    return dg.AssetCheckResult(
        check_name=CHECK_NAME,
        passed=conclusion.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=conclusion.description,
        metadata={**figures, "answer": conclusion.answer, "conclusion": conclusion.description},
    )


_ROW_TYPES = {f"{m}_{n}": pl.Float64 for m in ("base", "policy") for n in (*COMPONENTS, "audit")} | {
    "audit_difference": pl.Float64
}


def _no_heldout_result(
    context: dg.AssetExecutionContext, warehouse: Warehouse, heldout_share: float
) -> dg.MaterializeResult:
    warehouse.write_table(HELDOUT, pl.DataFrame(schema=_EMPTY_SCHEMA))
    reason = f"no held-out instructions (heldout_share {heldout_share}); grow the pool or raise it"
    context.log.warning(reason)
    return dg.MaterializeResult(
        metadata={"heldout_instructions": 0, "reason": reason, "llm_queries": "{}"},
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK_NAME,
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"cannot tell: {reason}",
                metadata={"reason": reason, "pass_rule": PASS_RULE, "answer": "cannot tell"},
            )
        ],
    )


def _figures(summary, df: pl.DataFrame, config, gate_reward: float, audit_judge: str) -> dict:
    """The comparison's figures: the metadata and the check's."""
    split = summary.gain_split
    c = summary.comparison
    audited = df.filter(pl.col("audit_difference").is_not_null())
    audit_figure = float(audited["audit_difference"].mean()) if audited.height else float("nan")
    return {
        "heldout_instructions": c.n,
        "samples_per_instruction": config.samples_per_instruction,
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
        # The difference = gate part + score part (GainSplit, refine_af_pipeline/evaluation/heldout.py):
        # only the score part can reach a fine-tuned model, since gated instances never reach SFT.
        "gain_from_fewer_gated": split.gate_part,
        "gain_from_fewer_gated_ci95": f"[{split.gate_part_ci[0]:+.3f}, {split.gate_part_ci[1]:+.3f}]",
        "gain_from_better_passing_scores": split.score_part,
        "gain_from_better_passing_scores_ci95": f"[{split.score_part_ci[0]:+.3f}, {split.score_part_ci[1]:+.3f}]",
        "passing_reward_base": split.passing_reward_base,
        "passing_reward_policy": split.passing_reward_policy,
        "gate_reward": gate_reward,
        "audit_judge": audit_judge,
        "audit_difference": audit_figure,
        "audit_instructions": int(audited.height),
        "pass_rule": PASS_RULE
        + (f"; and at least {config.min_instructions} instructions" if config.min_instructions else ""),
        "per_instruction": metadata_table(
            df.select("instruction", "base_reward", "policy_reward", "reward_difference", "outcome"), table=HELDOUT
        ),
    }
