"""The seed tasks TeaMs-RL's chains start from: the instructor trains on one side of the pipeline's
stable split (training/splits.py, salted apart from the other stages' splits) and is compared with
uniform operations on the other; a stage that takes fewer draws them with the pipeline's sampler."""

from __future__ import annotations

import polars as pl

from ..training.splits import sample_rows, stable_split

HELDOUT_SALT = "teams-heldout"

SeedTask = tuple[str, str]  # (seed id, instruction)


def seed_tasks(seed_pool: pl.DataFrame) -> list[SeedTask]:
    """(id, instruction) of every seed task, in the seed pool's order."""
    return list(zip(seed_pool["id"].to_list(), seed_pool["instruction"].to_list()))


def split_seed_tasks(seed_pool: pl.DataFrame, heldout_share: float) -> tuple[list[SeedTask], list[SeedTask]]:
    """(training seed tasks, held-out seed tasks), each in the seed pool's order."""
    held = stable_split(seed_pool["id"].to_list(), heldout_share, HELDOUT_SALT).held
    tasks = seed_tasks(seed_pool)
    return [t for t in tasks if t[0] not in held], [t for t in tasks if t[0] in held]


def sample_seed_tasks(tasks: list[SeedTask], limit: int, seed: int) -> list[SeedTask]:
    """At most `limit` of `tasks` (0 = all), drawn by the pipeline's sampler (in id order when drawn)."""
    frame = pl.DataFrame(tasks, schema={"id": pl.Utf8, "instruction": pl.Utf8}, orient="row")
    return seed_tasks(sample_rows(frame, limit, seed, order_by="id"))
