"""The teams_* tables of chain steps (the instructor's transitions, the comparison, the evolved
instructions) as frames: each row's own columns, then the columns every row of the run shares
(the policy file, the model as served, the reviewer, the run)."""

from __future__ import annotations

import polars as pl

# Columns that are null on some rows (a rule fired, the model was not asked).
STEP_SCHEMA = {"p_differs": pl.Float64, "rule": pl.Utf8, "reward": pl.Float64}


def transition_frame(rows: list[dict], **run_columns) -> pl.DataFrame:
    """`rows` with `run_columns` (in their order) appended to each."""
    return pl.DataFrame([{**r, **run_columns} for r in rows], schema_overrides=STEP_SCHEMA, infer_schema_length=None)


def policy_transitions_frame(
    transitions: list[dict], horizon: int, episodes_per_update: int, **run_columns
) -> pl.DataFrame:
    """teams_policy_transitions: the environment's transitions, in order, numbered by TRPO update."""
    return transition_frame(transitions, **run_columns).with_columns(
        (pl.int_range(pl.len()) // (horizon * episodes_per_update) + 1).alias("update")
    )
