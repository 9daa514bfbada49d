"""The query ledger: every model query of every stage, by role, from each stage's latest run (each
records its own counts as `llm_queries`: a column of its table, read from the rows of the run that
wrote the table last), so the branches' costs can be compared as TeaMs-RL compares its expert
queries with WizardLM's. A stage whose table has no llm_queries column yet (see
`recorded_in_table`) is read from its latest materialization's metadata instead."""

import json

import dagster as dg
import polars as pl

from refine_af_pipeline.llm.query_count import ROLES
from resources import Warehouse

from .metadata import metadata_table, table_metadata
from .shared import upstream_metadata

# asset -> (branch, purpose). The bootstrap's pool feeds the Self-Instruct, REFINE-AF and best-of-N
# branches, the reward scores the two that select by reward; held-out checks and comparisons are
# diagnostics, not data the branch needs.
LEDGER_STAGES = {
    "raw_instructions": ("self_instruct+refine_af+best_of_n", "data"),
    "reward_model": ("refine_af+best_of_n", "data"),
    "reward_scores": ("refine_af+best_of_n", "data"),
    "rl_refined_policy": ("refine_af", "data"),
    "rl_heldout_comparison": ("refine_af", "diagnostic"),
    "instance_output_pairs": ("refine_af", "data"),
    "selfinstruct_instance_pairs": ("self_instruct", "data"),
    "bestofn_instance_pairs": ("best_of_n", "data"),
    "teams_operation_policy": ("teams_rl", "data"),
    "teams_policy_comparison": ("teams_rl", "diagnostic"),
    "teams_evolved_instructions": ("teams_rl", "data"),
    "teams_instruction_pairs": ("teams_rl", "data"),
    "training_data_audit": ("refine_af+self_instruct+best_of_n+teams_rl", "diagnostic"),
    "evaluation": ("evaluation", "evaluation"),
}
BRANCHES = ("self_instruct", "refine_af", "best_of_n", "teams_rl")


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


def recorded_in_table(warehouse: Warehouse, asset: str) -> bool:
    """Whether `asset` records its query counts in its own table (an llm_queries column). Today
    rl_refined_policy, rl_heldout_comparison, the three instance stages and evaluation do;
    raw_instructions, reward_model, reward_scores, training_data_audit and the TeaMs-RL stages
    record them in their materialization's metadata only."""
    return "llm_queries" in warehouse.table_columns(asset)


def stage_queries(context: dg.AssetExecutionContext, warehouse: Warehouse, asset: str) -> tuple[dict, str | None]:
    """(role -> queries, run id) of `asset`'s latest run: from its table where it records them, else
    from its latest materialization."""
    if recorded_in_table(warehouse, asset):
        df = warehouse.latest_run_rows(asset, ["llm_queries"])
        if df is None or df.height == 0:
            return {}, None  # a run that wrote no rows (a held-out comparison without held-out instructions)
        recorded = df["llm_queries"].drop_nulls()
        if recorded.len() == 0:
            raise dg.Failure(
                f"the rows of {asset}'s latest run ({df['run_id'][0]}) record no llm_queries; "
                "materialize it again with this version of the pipeline"
            )
        return json.loads(recorded[-1]), df["run_id"][0]
    metadata = upstream_metadata(context, asset)
    if "llm_queries" not in metadata:
        raise dg.Failure(
            f"the latest materialization of {asset} (run {metadata['run_id']}) records no llm_queries; "
            "materialize it again with this version of the pipeline"
        )
    return json.loads(metadata["llm_queries"]), metadata["run_id"]


@dg.asset(
    group_name="evaluation",
    kinds={"duckdb"},
    deps=list(LEDGER_STAGES),
    description=(
        "One row per (stage, role): the model queries (prompts generated from, texts scored) of each stage's latest "
        "run, with its branch and purpose (data, diagnostic, evaluation); the metadata compares the "
        "branches, and TeaMs-RL's expert queries with the others' totals."
    ),
)
def llm_query_ledger(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    counts = {asset: stage_queries(context, warehouse, asset) for asset in LEDGER_STAGES}
    rows = ledger_rows(counts)
    df = pl.DataFrame(rows).with_columns(pl.lit(context.run_id).alias("run_id"))
    warehouse.write_table("llm_query_ledger", df)
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
            **table_metadata(df, ["stage", "role", "queries"]),
            **figures,
            "data_queries_by_branch_and_role": metadata_table(by_branch),
        }
    )
