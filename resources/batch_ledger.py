"""Generation that survives a crash: a plan of batches recorded in DuckDB, and each batch's rows
committed together with the record that the batch is done.

A generation stage first writes its plan (every batch's inputs, e.g. the sampled prompts) in one
transaction, then generates batch by batch; each batch's rows and the ledger mark go in one
transaction. When the process dies (SIGKILL, OOM-kill, reboot), the next materialization finds the
unfinished plan, skips the batches already committed and generates only the missing ones, with the
plan's own inputs and seeds. Rows from before the crash are never regenerated or rewritten.

Tables (in the warehouse, beside the stage tables):
- generation_plans: one row per plan (plan_id = the run that made it, asset, status, settings, and
  the model queries made for it: every run that worked on it, committed with its batches);
- generation_plan_batches: one row per planned batch (inputs as JSON, when and by which run it
  was committed, how many rows it wrote).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from refine_af_pipeline.llm.query_count import QueryCounter

from .warehouse import Warehouse, insert_rows, table_exists_on

PLANS = "generation_plans"
BATCHES = "generation_plan_batches"
# Each table's column descriptions (the UI's Columns table; assets/columns.py registers them).
COLUMNS = {
    PLANS: {
        "plan_id": "id of the generation plan: the run that made it (the plan's rows carry it as run_id)",
        "asset": "generation stage that owns the plan",
        "status": "plan status: open, finished, stopped_at_target (the bootstrap reached its pool size), "
        "skipped_at_target (a bootstrap run that had reached it: no batches) or abandoned",
        "settings": "the plan's settings as JSON: sampling, seed, batch size and what a resumed plan must match",
        "n_batches": "batches in the plan",
        "created_at": "when the plan was made (UTC)",
        "finished_at": "when the plan was finished or abandoned (UTC)",
        "finished_by_run_id": "run that finished or abandoned the plan",
        "llm_queries": "model queries made for the plan, by role, as JSON: every run that worked on it, each "
        "counted up to its last commit (the query ledger reads raw_instructions' from its newest plan)",
    },
    BATCHES: {
        "plan_id": "the plan the batch belongs to",
        "asset": "generation stage that owns the plan",
        "batch_index": "index of the batch in its plan (0-based)",
        "inputs": "the batch's inputs as JSON: the sampled prompts or the chosen instructions",
        "committed_at": "when the batch's rows were committed (UTC; null: not yet)",
        "committed_by_run_id": "run that committed the batch",
        "rows_written": "rows the batch wrote",
    },
}

_CREATE = [
    f"""CREATE TABLE IF NOT EXISTS {PLANS} (
        plan_id VARCHAR, asset VARCHAR, status VARCHAR, settings VARCHAR, n_batches INTEGER,
        created_at TIMESTAMP, finished_at TIMESTAMP, finished_by_run_id VARCHAR, llm_queries VARCHAR)""",
    f"""CREATE TABLE IF NOT EXISTS {BATCHES} (
        plan_id VARCHAR, asset VARCHAR, batch_index INTEGER, inputs VARCHAR,
        committed_at TIMESTAMP, committed_by_run_id VARCHAR, rows_written INTEGER)""",
    # A ledger written before plans recorded their model queries.
    f"ALTER TABLE {PLANS} ADD COLUMN IF NOT EXISTS llm_queries VARCHAR",
]


class LedgerError(RuntimeError):
    pass


@dataclass(frozen=True)
class PlannedBatch:
    index: int
    inputs: Any  # whatever the stage planned for this batch, JSON round-tripped


@dataclass
class GenerationPlan:
    plan_id: str
    asset: str
    settings: dict
    batches: list[PlannedBatch]
    committed: set[int] = field(default_factory=set)
    resumed: bool = False  # found unfinished in the ledger rather than made by this run
    queries_before: dict[str, int] = field(default_factory=dict)  # model queries earlier runs recorded for it

    def pending(self) -> list[PlannedBatch]:
        return [b for b in self.batches if b.index not in self.committed]

    def queries_json(self, this_run: Mapping[str, int]) -> str:
        """The plan's model queries by role (QueryCounter's JSON): the earlier runs' and this run's."""
        total = QueryCounter()
        total.counts.update(self.queries_before)
        total.counts.update(this_run)
        return total.as_json()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class BatchLedger:
    """The plans of one asset. At most one plan per asset is unfinished at a time (runs that
    write the warehouse never overlap: the run queue allows one)."""

    def __init__(self, warehouse: Warehouse, asset: str):
        self.warehouse = warehouse
        self.asset = asset

    def unfinished_plan(self) -> GenerationPlan | None:
        with self.warehouse.connect() as conn:
            if not table_exists_on(conn, PLANS):
                return None
            found = conn.execute(
                f"SELECT * FROM {PLANS} WHERE asset = ? AND status = 'open' ORDER BY created_at DESC", [self.asset]
            ).pl()
            if not found.height:
                return None
            if found.height > 1:
                raise LedgerError(
                    f"{self.asset} has {found.height} unfinished generation plans in {PLANS}; expected at most one"
                )
            row = found.row(0, named=True)
            plan_id, settings, queries = row["plan_id"], row["settings"], row.get("llm_queries")
            rows = conn.execute(
                f"SELECT batch_index, inputs, committed_at IS NOT NULL FROM {BATCHES} "
                "WHERE plan_id = ? AND asset = ? ORDER BY batch_index",
                [plan_id, self.asset],
            ).fetchall()
        return GenerationPlan(
            plan_id,
            self.asset,
            json.loads(settings),
            [PlannedBatch(i, json.loads(inputs)) for i, inputs, _ in rows],
            {i for i, _, done in rows if done},
            resumed=True,
            queries_before=json.loads(queries) if queries else {},
        )

    def take_unfinished(
        self, run_id: str, log, abandon_reason: Callable[[GenerationPlan], str | None], clear_rows_of: str | None = None
    ) -> GenerationPlan | None:
        """The unfinished plan to resume, or None. `abandon_reason(plan)` says why a plan must not
        be resumed (None: resume it); such a plan is closed as abandoned (and its rows deleted
        from the staging table `clear_rows_of`). Either way `log.warning` says what happened."""
        plan = self.unfinished_plan()
        if plan is None:
            return None
        progress = f"{len(plan.committed)} of {len(plan.batches)} batches committed"
        reason = abandon_reason(plan)
        if reason is not None:
            self.finish(plan, run_id, status="abandoned", clear_rows_of=clear_rows_of)
            log.warning(f"abandoned the unfinished plan of run {plan.plan_id} ({progress}): {reason}")
            return None
        log.warning(
            f"resuming the unfinished plan of run {plan.plan_id}: {progress} before it stopped; generating "
            f"the {len(plan.pending())} missing ones with that plan's inputs and settings"
        )
        return plan

    def start_plan(
        self, plan_id: str, settings: dict, batch_inputs: Sequence[Any], queries: Mapping[str, int] | None = None
    ) -> GenerationPlan:
        """Record a new plan and its batches in one transaction. `queries`: the model queries this
        run made so far (role -> count), recorded as the plan's (commit_batch and finish update them)."""
        plan = GenerationPlan(
            plan_id,
            self.asset,
            settings,
            [PlannedBatch(k, json.loads(json.dumps(i))) for k, i in enumerate(batch_inputs)],
        )
        with self.warehouse.transaction() as conn:
            for sql in _CREATE:
                conn.execute(sql)
            if conn.execute(
                f"SELECT count(*) FROM {PLANS} WHERE asset = ? AND status = 'open'", [self.asset]
            ).fetchone()[0]:
                raise LedgerError(f"{self.asset} already has an unfinished plan: resume or abandon it first")
            self._insert_plan(conn, plan, "open", queries)
            conn.executemany(
                f"INSERT INTO {BATCHES} VALUES (?, ?, ?, ?, NULL, NULL, NULL)",
                [[plan_id, self.asset, k, json.dumps(inputs)] for k, inputs in enumerate(batch_inputs)],
            )
        return plan

    def record_empty_plan(self, plan_id: str, settings: dict, status: str, queries: Mapping[str, int]) -> None:
        """Record a run that planned no batch (nothing left to generate) as a plan of none, closed at
        once with `status` and the model queries the run made: every run of the asset has its plan
        row, so the query ledger reads a run that made no queries as zeros, not as the run before."""
        plan = GenerationPlan(plan_id, self.asset, settings, [])
        with self.warehouse.transaction() as conn:
            for sql in _CREATE:
                conn.execute(sql)
            self._insert_plan(conn, plan, status, queries)

    def _insert_plan(self, conn, plan: GenerationPlan, status: str, queries: Mapping[str, int] | None) -> None:
        now, closed = _now(), status != "open"
        conn.execute(
            f"INSERT INTO {PLANS} (plan_id, asset, status, settings, n_batches, created_at, finished_at, "
            "finished_by_run_id, llm_queries) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                plan.plan_id,
                self.asset,
                status,
                json.dumps(plan.settings),
                len(plan.batches),
                now,
                now if closed else None,
                plan.plan_id if closed else None,
                None if queries is None else plan.queries_json(queries),
            ],
        )

    def _record_queries(self, conn, plan: GenerationPlan, queries: Mapping[str, int] | None) -> None:
        """Set the plan's model queries to the earlier runs' plus this run's so far (in the caller's
        transaction, so they land with the batch that made them)."""
        if queries is None:
            return
        if plan.resumed:
            conn.execute(_CREATE[-1])  # a plan from a ledger written before plans recorded queries
        conn.execute(
            f"UPDATE {PLANS} SET llm_queries = ? WHERE plan_id = ? AND asset = ?",
            [plan.queries_json(queries), plan.plan_id, self.asset],
        )

    def latest_plan(self) -> dict | None:
        """This asset's newest plan as its generation_plans row (column -> value), or None."""
        with self.warehouse.connect() as conn:
            if not table_exists_on(conn, PLANS):
                return None
            found = conn.execute(
                f"SELECT * FROM {PLANS} WHERE asset = ? ORDER BY created_at DESC LIMIT 1", [self.asset]
            ).pl()
        return found.row(0, named=True) if found.height else None

    def commit_batch(
        self,
        plan: GenerationPlan,
        batch: PlannedBatch,
        table: str,
        rows: pl.DataFrame,
        run_id: str,
        also_append: dict[str, pl.DataFrame] | None = None,
        queries: Mapping[str, int] | None = None,
    ) -> None:
        """Append the batch's rows to `table` (and each frame of `also_append` to its table: a stage
        that writes several tables per batch) and mark the batch committed, in one transaction;
        with `queries` (the model queries this run made so far), the plan's queries too."""
        with self.warehouse.transaction() as conn:
            done = conn.execute(
                f"SELECT committed_at IS NOT NULL FROM {BATCHES} WHERE plan_id = ? AND asset = ? AND batch_index = ?",
                [plan.plan_id, self.asset, batch.index],
            ).fetchone()
            if done is None or done[0]:
                raise LedgerError(
                    f"{self.asset} plan {plan.plan_id} batch {batch.index} is "
                    f"{'not in the plan' if done is None else 'already committed'}"
                )
            for name, df in {table: rows, **(also_append or {})}.items():
                if df.height:
                    insert_rows(conn, name, df, mode="append")
            conn.execute(
                f"UPDATE {BATCHES} SET committed_at = ?, committed_by_run_id = ?, rows_written = ? "
                "WHERE plan_id = ? AND asset = ? AND batch_index = ?",
                [_now(), run_id, rows.height, plan.plan_id, self.asset, batch.index],
            )
            self._record_queries(conn, plan, queries)
        plan.committed.add(batch.index)

    def finish(
        self,
        plan: GenerationPlan,
        run_id: str,
        status: str = "finished",
        replace: dict[str, pl.DataFrame] | None = None,
        clear_rows_of: str | None = None,
        queries: Mapping[str, int] | None = None,
    ) -> None:
        """Close the plan. In the same transaction: replace each table in `replace` with its frame
        (stages whose table is rewritten per run publish the finished plan this way), delete
        the plan's rows (column run_id = plan_id) from the staging table `clear_rows_of`, and record
        the plan's model queries with `queries` (this run's)."""
        with self.warehouse.transaction() as conn:
            for name, df in (replace or {}).items():
                insert_rows(conn, name, df, mode="replace")
            if clear_rows_of and table_exists_on(conn, clear_rows_of):
                conn.execute(f'DELETE FROM "{clear_rows_of}" WHERE run_id = ?', [plan.plan_id])
            conn.execute(
                f"UPDATE {PLANS} SET status = ?, finished_at = ?, finished_by_run_id = ? "
                "WHERE plan_id = ? AND asset = ?",
                [status, _now(), run_id, plan.plan_id, self.asset],
            )
            self._record_queries(conn, plan, queries)

    def batch_log(self) -> pl.DataFrame | None:
        """Every planned batch of this asset with when and by which run it was committed."""
        with self.warehouse.connect() as conn:
            if not table_exists_on(conn, BATCHES):
                return None
            return conn.execute(
                f"SELECT plan_id, batch_index, committed_at, committed_by_run_id, rows_written "
                f"FROM {BATCHES} WHERE asset = ? ORDER BY plan_id, batch_index",
                [self.asset],
            ).pl()
