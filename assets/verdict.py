"""The verdict: did RL help? One row per question, from the comparisons the graph already made."""

import json

import dagster as dg
import numpy as np
import polars as pl

from refine_af_pipeline.evaluation.verdict import RULE, VerdictSettings, difference_table, verdict_markdown, verdict_row
from resources import Warehouse

from . import groups
from .columns import declare
from .data_audit import AUDIT
from .evaluation import EVALUATION
from .finetune import SFT_DATA
from .metadata import metadata_table, table_metadata
from .query_ledger import LEDGER
from .rl_heldout import HELDOUT
from .teams import COMPARISON

VERDICT = "rl_verdict"
SOURCES = [HELDOUT, AUDIT, EVALUATION, COMPARISON, SFT_DATA, LEDGER]
COLUMNS = declare(
    {
        VERDICT: {
            "question": "the question the row answers",
            "candidate": "what the question asks about: the RL policy, an arm's data, the TeaMs-RL instructor",
            "reference": "what it is compared with",
            "metric": "what is compared (rouge_l, log_likelihood, audit, training reward, reviewer reward per step)",
            "judge": "what produced the numbers compared",
            "effect": "mean of candidate minus reference over the items and seeds",
            "ci95_low": "lower end of the 95% bootstrap CI of the effect (seeds and items resampled together)",
            "ci95_high": "upper end of the 95% bootstrap CI of the effect",
            "n_items": "items compared (tasks, instructions or seed tasks)",
            "n_seeds": "replicates (seeds) compared",
            "margin": "smallest effect that matters for this metric",
            "min_detectable_difference": "effect the comparison finds 80% of the time at 5% (2.8 standard errors)",
            "answer": "yes / no / cannot tell, by the rule",
            "note": "what else to know to read the row",
            "per_seed_effects": "the effect within each seed (replicate) alone, in seed order, separated by ' / ' "
            "(the pooled effect is their item-weighted mean)",
            "answer_rule": "how the answer follows from the CI and the margin",
        }
    }
)


class VerdictConfig(dg.Config, VerdictSettings):
    """Run config of `rl_verdict`: the fields of VerdictSettings (refine_af_pipeline/evaluation/verdict.py)."""


def _required(warehouse: Warehouse, table: str) -> pl.DataFrame:
    df = warehouse.read_table(table)
    if df is None or df.height == 0:
        raise dg.Failure(f"{table} is missing or empty: materialize it before {VERDICT}")
    return df


def _budgets(ledger: pl.DataFrame) -> dict[str, int]:
    """Generator queries per arm (data stages only; the shared bootstrap counted in every arm it feeds)."""
    totals: dict[str, int] = {}
    for row in ledger.filter((pl.col("purpose") == "data") & (pl.col("role") == "generator")).iter_rows(named=True):
        for arm in row["branch"].split("+"):
            totals[arm] = totals.get(arm, 0) + int(row["queries"])
    return totals


DESCRIPTION = (
    "Did RL help? (a) the RL policy against the base model on held-out instructions; (b) REFINE-AF data against "
    "Self-Instruct data after the same SFT; (c) against best-of-N data; (d) the TeaMs-RL instructor against uniform "
    "operations and the best fixed operation. One row per question and metric: the effect with its 95% CI "
    "bootstrapped over seeds and items together, n, seeds, the margin, the minimum detectable difference (80% "
    "power) and the answer by the rule: " + RULE + "."
)


@dg.asset(
    name=VERDICT,
    group_name=groups.EVALUATION,
    kinds={"duckdb"},
    deps=SOURCES,
    description=DESCRIPTION,
    check_specs=[
        dg.AssetCheckSpec(
            "every_question_answered",
            asset=VERDICT,
            description=("Warns when a question's answer is 'cannot tell': the run was too small to say."),
        )
    ],
)
def rl_verdict(context: dg.AssetExecutionContext, config: VerdictConfig, warehouse: Warehouse) -> dg.MaterializeResult:
    heldout = _required(warehouse, HELDOUT)
    audited = _required(warehouse, AUDIT)
    evaluation = _required(warehouse, EVALUATION)
    teams = _required(warehouse, COMPARISON)
    drawn = _required(warehouse, SFT_DATA)
    budgets = _budgets(_required(warehouse, LEDGER))
    boot = dict(resamples=config.bootstrap_resamples, seed=config.seed)
    audit_judge = audited["audit_judge"][0]
    rows = [
        *_rl_policy_rows(heldout, audit_judge, config, boot),
        *_data_rows(evaluation, audited, drawn, budgets, audit_judge, config, boot),
        *_teams_rows(teams, config, boot),
    ]
    df = pl.DataFrame([r.as_dict() for r in rows]).with_columns(pl.lit(context.run_id).alias("run_id"))
    warehouse.write_table(VERDICT, df)
    return dg.MaterializeResult(metadata=_verdict_metadata(df, rows, config), check_results=[_answered_check(rows)])


def _rl_policy_rows(heldout: pl.DataFrame, audit_judge: str, config: VerdictConfig, boot: dict) -> list:
    """Question a: the RL policy against the base model on held-out instructions, by audit and by training reward."""
    scorers = heldout["scorers"][0] if "scorers" in heldout.columns else "unknown"
    question_a = "a. RL policy beats the base model on held-out instructions"
    both_audited = heldout.filter(pl.col("audit_difference").is_not_null())
    rows = []
    if both_audited.height:
        rows.append(
            verdict_row(
                question_a,
                "rl_policy",
                "base",
                "audit (PMI, nats/token)",
                audit_judge,
                both_audited["audit_difference"].to_numpy()[None, :],
                config.margin_audit,
                **boot,
                note=(
                    f"gate-passing instances; {heldout.height - both_audited.height} instructions without one on a side"
                ),
            )
        )
    rows.append(
        verdict_row(
            question_a,
            "rl_policy",
            "base",
            "training reward",
            f"training reward ({', '.join(json.loads(scorers).values()) if scorers != 'unknown' else scorers})",
            heldout["reward_difference"].to_numpy()[None, :],
            config.margin_reward,
            **boot,
            note="the reward RL trained on: not an independent judge",
        )
    )
    return rows


def _data_rows(
    evaluation: pl.DataFrame,
    audited: pl.DataFrame,
    drawn: pl.DataFrame,
    budgets: dict[str, int],
    audit_judge: str,
    config: VerdictConfig,
    boot: dict,
) -> list:
    """Questions b and c: REFINE-AF data against Self-Instruct and best-of-N data, after SFT and before it."""
    audit_by_instruction = (
        audited.group_by("branch", "replicate", "instruction_id").agg(pl.col("audit").mean()).to_dicts()
    )
    first = drawn.filter(pl.col("replicate") == drawn["replicate"].min())
    pairs = {
        a: first.filter((pl.col("branch") == a) & (pl.col("slice") == "train")).height
        for a in first["branch"].unique().to_list()
    }
    task_rows = evaluation.to_dicts()
    rows = []
    for question, reference in (
        ("b. REFINE-AF data beats Self-Instruct data after SFT", "self_instruct"),
        ("c. REFINE-AF data beats best-of-N data after SFT", "best_of_n"),
    ):
        note = (
            f"train pairs {pairs.get('refine_af', 0)} vs {pairs.get(reference, 0)}; generator queries "
            f"{budgets.get('refine_af', 0)} vs {budgets.get(reference, 0)}"
        )
        for metric, margin in (("rouge_l", config.margin_rouge_l), ("log_likelihood", config.margin_log_likelihood)):
            rows.append(
                verdict_row(
                    question,
                    "refine_af",
                    reference,
                    metric,
                    "evaluation tasks (references)",
                    difference_table(task_rows, "refine_af", reference, metric),
                    margin,
                    **boot,
                    note=note,
                )
            )
        # The data itself, instruction by instruction, before any SFT.
        table = difference_table(
            audit_by_instruction, "refine_af", reference, "audit", model_key="branch", item_key="instruction_id"
        )
        if not np.isnan(table).all():
            rows.append(
                verdict_row(
                    question.replace("after SFT", "(the training pairs)"),
                    "refine_af",
                    reference,
                    "audit (PMI, nats/token)",
                    audit_judge,
                    table,
                    config.margin_audit,
                    **boot,
                    note="instructions both arms trained on",
                )
            )
    return rows


def _teams_rows(teams: pl.DataFrame, config: VerdictConfig, boot: dict) -> list:
    """Question d: the TeaMs-RL instructor against uniform operations and the best fixed operation."""
    per_seed = teams.group_by("arm", "seed_id").agg(pl.col("reward").mean()).to_dicts()
    fixed = next((a for a in teams["arm"].unique().to_list() if a.startswith("fixed:")), None)
    if fixed is None:
        raise dg.Failure("teams_policy_comparison has no fixed:<operation> arm: materialize it again")
    rows = []
    for question, reference in (
        ("d. TeaMs-RL instructor beats uniform operations", "uniform"),
        ("d. TeaMs-RL instructor beats the best fixed operation", fixed),
    ):
        rows.append(
            verdict_row(
                question,
                "teams_policy",
                reference,
                "reviewer reward per step",
                "frozen reviewer",
                difference_table(per_seed, "policy", reference, "reward", model_key="arm", item_key="seed_id"),
                config.margin_teams_reward,
                **boot,
            )
        )
    return rows


def _verdict_metadata(df: pl.DataFrame, rows: list, config: VerdictConfig) -> dict:
    """The asset's metadata: the table, each question's answer, the rule and the verdict as markdown."""
    figures = {
        "answers": json.dumps({f"{r.question} ({r.metric})": r.answer for r in rows}),
        "verdict": dg.MetadataValue.md(verdict_markdown([r.as_dict() for r in rows])),
        "rule": RULE,
        "bootstrap_resamples": config.bootstrap_resamples,
    }
    return {
        **table_metadata(df, ["question", "metric", "effect", "answer"], table=VERDICT),
        **figures,
        "table": metadata_table(df.drop("run_id", "answer_rule"), table=VERDICT),
    }


def _answered_check(rows: list) -> dg.AssetCheckResult:
    """The every_question_answered check: warns with the questions whose answer is 'cannot tell'."""
    unanswered = [r.question + f" ({r.metric})" for r in rows if r.answer == "cannot tell"]
    return dg.AssetCheckResult(
        check_name="every_question_answered",
        passed=not unanswered,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"cannot_tell": "; ".join(unanswered) or "none"},
    )
