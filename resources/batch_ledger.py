"""Generation that survives a crash: a plan of batches recorded in DuckDB, and each batch's rows
committed together with the record that the batch is done.

A generation stage first writes its plan (every batch's inputs, e.g. the sampled prompts) in one
transaction, then generates batch by batch; each batch's rows and the ledger mark go in one
transaction. When the process dies (SIGKILL, OOM-kill, reboot), the next materialization finds the
unfinished plan, skips the batches already committed and generates only the missing ones, with the
plan's own inputs and seeds. Rows from before the crash are never regenerated or rewritten.

Tables (in the warehouse, beside the stage tables):
- generation_plans: one row per plan (plan_id = the run that made it, asset, status, settings);
- generation_plan_batches: one row per planned batch (inputs as JSON, when and by which run it
  was committed, how many rows it wrote).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from .warehouse import Warehouse, insert_rows, table_exists_on

PLANS = "generation_plans"
BATCHES = "generation_plan_batches"

_CREATE = [
    f"""CREATE TABLE IF NOT EXISTS {PLANS} (
        plan_id VARCHAR, asset VARCHAR, status VARCHAR, settings VARCHAR, n_batches INTEGER,
        created_at TIMESTAMP, finished_at TIMESTAMP, finished_by_run_id VARCHAR)""",
    f"""CREATE TABLE IF NOT EXISTS {BATCHES} (
        plan_id VARCHAR, asset VARCHAR, batch_index INTEGER, inputs VARCHAR,
        committed_at TIMESTAMP, committed_by_run_id VARCHAR, rows_written INTEGER)""",
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

    def pending(self) -> list[PlannedBatch]:
        return [b for b in self.batches if b.index not in self.committed]


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
                f"SELECT plan_id, settings FROM {PLANS} WHERE asset = ? AND status = 'open' ORDER BY created_at DESC",
                [self.asset],
            ).fetchall()
            if not found:
                return None
            if len(found) > 1:
                raise LedgerError(
                    f"{self.asset} has {len(found)} unfinished generation plans in {PLANS}; expected at most one"
                )
            plan_id, settings = found[0]
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

    def start_plan(self, plan_id: str, settings: dict, batch_inputs: Sequence[Any]) -> GenerationPlan:
        """Record a new plan and its batches in one transaction."""
        now = _now()
        with self.warehouse.transaction() as conn:
            for sql in _CREATE:
                conn.execute(sql)
            if conn.execute(
                f"SELECT count(*) FROM {PLANS} WHERE asset = ? AND status = 'open'", [self.asset]
            ).fetchone()[0]:
                raise LedgerError(f"{self.asset} already has an unfinished plan: resume or abandon it first")
            conn.execute(
                f"INSERT INTO {PLANS} VALUES (?, ?, 'open', ?, ?, ?, NULL, NULL)",
                [plan_id, self.asset, json.dumps(settings), len(batch_inputs), now],
            )
            conn.executemany(
                f"INSERT INTO {BATCHES} VALUES (?, ?, ?, ?, NULL, NULL, NULL)",
                [[plan_id, self.asset, k, json.dumps(inputs)] for k, inputs in enumerate(batch_inputs)],
            )
        return GenerationPlan(
            plan_id,
            self.asset,
            settings,
            [PlannedBatch(k, json.loads(json.dumps(i))) for k, i in enumerate(batch_inputs)],
        )

    def commit_batch(
        self,
        plan: GenerationPlan,
        batch: PlannedBatch,
        table: str,
        rows: pl.DataFrame,
        run_id: str,
        also_append: dict[str, pl.DataFrame] | None = None,
    ) -> None:
        """Append the batch's rows to `table` (and each frame of `also_append` to its table: a stage
        that writes several tables per batch) and mark the batch committed, in one transaction."""
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
        plan.committed.add(batch.index)

    def finish(
        self,
        plan: GenerationPlan,
        run_id: str,
        status: str = "finished",
        replace: dict[str, pl.DataFrame] | None = None,
        clear_rows_of: str | None = None,
    ) -> None:
        """Close the plan. In the same transaction: replace each table in `replace` with its frame
        (stages whose table is rewritten per run publish the finished plan this way), and delete
        the plan's rows (column run_id = plan_id) from the staging table `clear_rows_of`."""
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
