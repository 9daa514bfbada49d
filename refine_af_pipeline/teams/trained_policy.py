"""teams_operation_policy's table, the hand-over to the stages after it. One row per TRPO update;
every row also names the policy file, the reviewer the policy was trained against, the settings it
was trained with (JSON) and the run. The comparison and the evolved instructions follow those
settings (operations, horizon, held-out share, rewrite sampling, the reviewer's rule), read from
this table, not from the orchestrator's event log: the data folder is the whole state."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .instructor import InstructorSettings, load_policy

POLICY_TABLE = "teams_operation_policy"
TRANSITIONS_TABLE = "teams_policy_transitions"
# What a reader needs from the table's rows.
HANDED_OVER = ("policy_path", "reviewer_version", "settings")


def policy_log_frame(
    log: list[dict],
    policy_path: str | Path,
    reviewer_version: str,
    settings: InstructorSettings,
    run_id: str,
    llm_queries: str | None = None,
) -> pl.DataFrame:
    """The table: the training log, one row per update, and what the stages after it read;
    `llm_queries`, the run's model queries by role as JSON (QueryCounter.as_json), for the query
    ledger (None: no such column)."""
    queries = [] if llm_queries is None else [pl.lit(llm_queries).alias("llm_queries")]
    return pl.DataFrame(log).with_columns(
        pl.lit(str(policy_path)).alias("policy_path"),
        pl.lit(reviewer_version).alias("reviewer_version"),
        pl.lit(settings_json(settings)).alias("settings"),
        *queries,
        pl.lit(run_id).alias("run_id"),
    )


def settings_json(settings: InstructorSettings) -> str:
    return json.dumps(settings.model_dump())


@dataclass(frozen=True)
class TrainedPolicy:
    """The policy one run of teams_operation_policy trained, as its table records it."""

    settings: InstructorSettings
    policy_file: str  # where the weights are in this data folder
    reviewer_version: str
    run_id: str

    @classmethod
    def from_rows(cls, rows: pl.DataFrame, policy_file: str | Path) -> TrainedPolicy:
        """`rows`: the table's rows of one run (HANDED_OVER and run_id); `policy_file`: the path its
        policy_path names, found in this data folder."""
        row = rows.row(rows.height - 1, named=True)
        try:
            settings = InstructorSettings(**json.loads(row["settings"]))
        except ValueError as err:  # pydantic's ValidationError is one
            raise ValueError(
                f"{POLICY_TABLE}'s run {row['run_id']} recorded settings this version cannot read "
                f"({' '.join(str(err).split())}); "
                f"materialize {POLICY_TABLE} again"
            ) from err
        return cls(settings, str(policy_file), row["reviewer_version"], row["run_id"])

    def load(self) -> Callable[[np.ndarray], np.ndarray]:
        """The policy as a function from observations to action distributions."""
        return load_policy(self.policy_file, len(self.settings.operations))

    def transitions_conflict(self, transitions_run_ids: Iterable[str]) -> str | None:
        """Why teams_policy_transitions (written by `transitions_run_ids`) is not this policy's, or None."""
        runs = sorted(set(transitions_run_ids))
        if runs == [self.run_id]:
            return None
        return (
            f"{TRANSITIONS_TABLE} holds the transitions of run(s) {', '.join(runs) or 'none'}, but {POLICY_TABLE} "
            f"was trained by run {self.run_id}: materialize {POLICY_TABLE} again (one step writes both)"
        )

    def reviewer_conflict(self, stage: str, reviewer_version: str) -> str | None:
        """Why `stage`'s reviewer is not the one the policy was trained against, or None: its rewards
        would be another reward than the policy's, and the comparison against uniform meaningless."""
        if reviewer_version == self.reviewer_version:
            return None
        return (
            f"{stage} reviews with {reviewer_version}, but {POLICY_TABLE} (run {self.run_id}) was trained against "
            f"the reviewer {self.reviewer_version}: serve the model it was trained with as language_model, or "
            f"materialize {POLICY_TABLE} again with this one"
        )
