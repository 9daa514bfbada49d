"""The query ledger: every model query of every stage, by role, from each stage's latest run, so the
branches' costs can be compared as TeaMs-RL compares its expert queries with WizardLM's. Each stage
records its own counts as `llm_queries` in the data folder, never only in the Dagster instance: a
column of its table, read from the rows of the run that wrote the table last; raw_instructions, whose
rows are appended batch by batch and whose run may write none, on its newest generation plan
(generation_plans, written by its own step: the queries of every run that worked on the plan)."""

import json

import dagster as dg
import polars as pl

from refine_af_pipeline.llm.query_count import ROLES
from resources import Warehouse
from resources.batch_ledger import BatchLedger

from . import groups
from .columns import declare
from .data_audit import AUDIT
from .evaluation import EVALUATION
from .instance_pairs import BESTOFN_PAIRS, INSTANCE_PAIRS, SELFINSTRUCT_PAIRS
from .instructions import RAW
from .metadata import metadata_table, table_metadata
from .reward_model import REWARD_MODEL
from .rewards import REWARD_SCORES
from .rl_heldout import HELDOUT
from .rl_policy import RL_POLICY
from .teams import COMPARISON, EVOLVED, EXPERT_PAIRS, POLICY

# asset -> (branch, purpose). The bootstrap's pool feeds the Self-Instruct, REFINE-AF and best-of-N
# branches, the reward scores the two that select by reward; held-out checks and comparisons are
# diagnostics, not data the branch needs.
LEDGER_STAGES = {
    RAW: ("self_instruct+refine_af+best_of_n", "data"),
    REWARD_MODEL: ("refine_af+best_of_n", "data"),
    REWARD_SCORES: ("refine_af+best_of_n", "data"),
    RL_POLICY: ("refine_af", "data"),
    HELDOUT: ("refine_af", "diagnostic"),
    INSTANCE_PAIRS: ("refine_af", "data"),
    SELFINSTRUCT_PAIRS: ("self_instruct", "data"),
    BESTOFN_PAIRS: ("best_of_n", "data"),
    POLICY: ("teams_rl", "data"),
    COMPARISON: ("teams_rl", "diagnostic"),
    EVOLVED: ("teams_rl", "data"),
    EXPERT_PAIRS: ("teams_rl", "data"),
    AUDIT: ("refine_af+self_instruct+best_of_n+teams_rl", "diagnostic"),
    EVALUATION: ("evaluation", "evaluation"),
}
BRANCHES = ("self_instruct", "refine_af", "best_of_n", "teams_rl")
LEDGER = "llm_query_ledger"
COLUMNS = declare(
    {
        LEDGER: {
            "stage": "asset whose step made the queries",
            "branch": "the arm the stage's data feeds: self_instruct, refine_af, best_of_n, teams_rl, or several "
            "joined by + (a stage they share); evaluation for the evaluation",
            "purpose": "data (the branch needs it), diagnostic (a check or comparison) or evaluation",
            "role": f"what the model did: {', '.join(ROLES)}",
            "queries": "model queries: prompts generated from plus texts scored",
            "source_run_id": "the stage's latest run, whose counts the row holds",
        },
        f"{LEDGER}/by_branch": {
            "branch": "the arm of the comparison (a shared stage's queries counted in every arm it feeds)",
            **{role: f"data queries in the {role} role" for role in ROLES},
            "total": "data queries of the arm, every role",
        },
    }
)
# Stages whose queries are their newest generation plan's (instructions.py), not their table's rows'.
PLAN_RECORDED = {RAW}


def ledger_rows(counts_by_asset: dict[str, tuple[dict, str]]) -> list[dict]:
    rows = []
    for asset, (counts, run_id) in counts_by_asset.items():
        branch, purpose = LEDGER_STAGES[asset]
        rows += [
            dict(stage=asset, branch=branch, purpose=purpose, role=role, queries=int(n), source_run_id=run_id)
            for role, n in counts.items()
        ]
    return rows


def branch_totals(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per branch, the data queries by role (a shared stage counted in every branch it feeds)."""
    totals = {b: {r: 0 for r in ROLES} for b in BRANCHES}
    for row in rows:
        if row["purpose"] != "data":
            continue
        for branch in BRANCHES:
            if branch in row["branch"].split("+"):
                totals[branch][row["role"]] += row["queries"]
    return totals


def stage_queries(warehouse: Warehouse, asset: str) -> tuple[dict, str | None]:
    """(role -> queries, run id) of `asset`'s latest run, read from the data folder alone."""
    if asset in PLAN_RECORDED:
        return plan_queries(warehouse, asset)
    columns = warehouse.table_columns(asset)
    if not columns:
        raise dg.Failure(f"{asset} has no table in {warehouse.database}: materialize it first")
    df = warehouse.latest_run_rows(asset, ["llm_queries"] if "llm_queries" in columns else ["run_id"])
    if df.height == 0:
        return {}, None  # a run that wrote no rows (a held-out comparison without held-out instructions)
    recorded = df["llm_queries"].drop_nulls() if "llm_queries" in columns else []
    if len(recorded) == 0:
        raise dg.Failure(
            f"the rows of {asset}'s latest run ({df['run_id'][0]}) record no llm_queries; "
            "materialize it again with this version of the pipeline"
        )
    return json.loads(recorded[-1]), df["run_id"][0]


def plan_queries(warehouse: Warehouse, asset: str) -> tuple[dict, str]:
    """(role -> queries, plan id) of `asset`'s newest generation plan: every run that worked on the
    plan (one resumed after a crash: the run that made it and the one that finished it), counted
    with the batches they committed; a run with nothing to generate records a plan of no batches."""
    plan = BatchLedger(warehouse, asset).latest_plan()
    if plan is None:
        raise dg.Failure(f"{asset} has no generation plan in {warehouse.database}: materialize it first")
    if plan.get("llm_queries") is None:
        raise dg.Failure(
            f"the generation plan of {asset}'s latest run ({plan['plan_id']}) records no llm_queries; "
            "materialize it again with this version of the pipeline"
        )
    return json.loads(plan["llm_queries"]), plan["plan_id"]


@dg.asset(
    name=LEDGER,
    group_name=groups.EVALUATION,
    kinds={"duckdb"},
    deps=list(LEDGER_STAGES),
    description=(
        "One row per (stage, role): the model queries (prompts generated from, texts scored) of each stage's latest "
        "run, with its branch and purpose (data, diagnostic, evaluation); the metadata compares the "
        "branches, and TeaMs-RL's expert queries with the others' totals."
    ),
)
def llm_query_ledger(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    counts = {asset: stage_queries(warehouse, asset) for asset in LEDGER_STAGES}
    rows = ledger_rows(counts)
    df = pl.DataFrame(rows).with_columns(pl.lit(context.run_id).alias("run_id"))
    warehouse.write_table(LEDGER, df)
    totals = branch_totals(rows)
    total = {b: sum(t.values()) for b, t in totals.items()}
    expert = totals["teams_rl"]["expert"]
    figures = {
        **{f"data_queries_{b}": n for b, n in total.items()},
        # The generation budget of each arm: RL's rollouts and instances against best-of-N's candidates.
        **{f"generator_queries_{b}": t["generator"] for b, t in totals.items()},
        "teams_rl_expert_queries": expert,
        "teams_rl_expert_share_of_its_queries": expert / total["teams_rl"] if total["teams_rl"] else 0.0,
        "teams_rl_expert_queries_per_refine_af_query": expert / total["refine_af"] if total["refine_af"] else 0.0,
        "teams_rl_expert_queries_per_self_instruct_query": expert / total["self_instruct"]
        if total["self_instruct"]
        else 0.0,
    }
    by_branch = pl.DataFrame([{"branch": b, **t, "total": total[b]} for b, t in totals.items()])
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["stage", "role", "queries"], table=LEDGER),
            **figures,
            "data_queries_by_branch_and_role": metadata_table(by_branch, table=f"{LEDGER}/by_branch"),
        }
    )
