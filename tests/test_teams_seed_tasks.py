"""TeaMs-RL's seed tasks: the pipeline's stable split (salted) and sampler."""

import polars as pl
import pytest

from refine_af_pipeline.teams.seed_tasks import HELDOUT_SALT, sample_seed_tasks, split_seed_tasks
from refine_af_pipeline.training.splits import in_share, sample_rows

pytestmark = pytest.mark.unit

POOL = pl.DataFrame({"id": [f"seed_task_{k}" for k in range(175)], "instruction": [f"Task {k}." for k in range(175)]})


def test_the_held_out_seed_tasks_are_the_salted_hash_share_in_the_pools_order():
    train, held = split_seed_tasks(POOL, 0.3)
    # The same held-out set as before the one stable split: the salted hash share.
    assert [i for i, _ in held] == [i for i in POOL["id"] if in_share(i, 0.3, HELDOUT_SALT)]
    assert [i for i, _ in train] == [i for i in POOL["id"] if not in_share(i, 0.3, HELDOUT_SALT)]
    assert 40 <= len(held) <= 65 and dict(held)[held[0][0]] == f"Task {held[0][0].split('_')[-1]}."
    assert split_seed_tasks(POOL, 0.0) == (list(zip(POOL["id"], POOL["instruction"])), [])


def test_a_sample_is_the_pipelines_sampler_on_seed_ids():
    _, held = split_seed_tasks(POOL, 0.3)
    drawn = sample_seed_tasks(held, 4, seed=0)
    expected = sample_rows(pl.DataFrame(held, schema=["id", "instruction"], orient="row"), 4, 0, order_by="id")
    assert drawn == list(zip(expected["id"], expected["instruction"])) and len(drawn) == 4
    assert drawn == sample_seed_tasks(held, 4, seed=0) != sample_seed_tasks(held, 4, seed=1)
    assert sample_seed_tasks(held, 0, seed=0) == held == sample_seed_tasks(held, len(held), seed=0)
