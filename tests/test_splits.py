"""The pipeline's one stable split and one sampler (refine_af_pipeline/training/splits.py)."""

import polars as pl
import pytest

from refine_af_pipeline.training.splits import BUCKETS, hash_bucket, in_share, sample_rows, stable_split

pytestmark = pytest.mark.unit

IDS = [f"run-{k:05d}" for k in range(400)]


def test_without_bounds_the_split_is_exactly_the_salted_hash_share():
    split = stable_split(IDS, 0.3, salt="s")
    assert split.held == {i for i in IDS if hash_bucket(i, "s") < 0.3 * BUCKETS} and split.share == 0.3
    assert split.held != stable_split(IDS, 0.3, salt="other").held  # salts give independent splits


def test_the_split_depends_on_the_set_of_keys_only():
    split = stable_split(IDS, 0.2, "s", minimum=5, max_fraction=0.5)
    assert split == stable_split(list(reversed(IDS)) + IDS[:50], 0.2, "s", minimum=5, max_fraction=0.5)


@pytest.mark.parametrize(
    ("n", "share", "minimum", "max_fraction", "held"),
    [
        (12, 0.0, 6, 0.5, 6),  # the minimum, below the cap
        (9, 0.0, 6, 0.5, 4),  # the minimum, capped at half the pool
        (16, 0.0, 4, 0.25, 4),
        (8, 0.0, 4, 0.25, 2),  # a quarter of 8
        (2, 0.0, 4, 0.25, 0),  # a quarter of 2 is 0: nothing held out
        (3, 0.0, 4, 0.25, 0),
        (40, 0.9, 0, 0.25, 10),  # a share above the cap is capped
    ],
)
def test_bounds_hold_out_the_lowest_hash_keys(n, share, minimum, max_fraction, held):
    ids = IDS[:n]
    split = stable_split(ids, share, "s", minimum, max_fraction)
    assert len(split.held) == held
    lowest = sorted(ids, key=lambda k: (hash_bucket(k, "s"), k))[:held]
    assert split.held == set(lowest)
    # The recorded share re-derives the same side for every key ...
    assert {i for i in ids if in_share(i, split.share, "s")} == split.held


@pytest.mark.parametrize(("n", "held"), [(1, 0), (2, 1), (3, 1), (4, 1), (8, 2)])
def test_min_cap_raises_the_cap_on_a_tiny_pool_but_leaves_one_key_out(n, held):
    split = stable_split(IDS[:n], 0.0, "s", minimum=4, max_fraction=0.25, min_cap=1)
    assert len(split.held) == held
    assert {i for i in IDS[:n] if in_share(i, split.share, "s")} == split.held


def test_a_recorded_share_on_a_grown_pool_adds_only_new_keys_to_the_held_side():
    split = stable_split(IDS[:12], 0.2, "", minimum=6, max_fraction=0.5)
    trained = set(IDS[:12]) - split.held
    grown = IDS[:12] + [f"new-{k}" for k in range(50)]
    assert not {i for i in grown if in_share(i, split.share)} & trained


def test_the_sampler_is_reproducible_ordered_and_keeps_small_frames_whole():
    df = pl.DataFrame({"instruction_id": IDS[:50], "x": range(50)})
    first = sample_rows(df, 10, seed=3)
    assert first.height == 10 and first.equals(sample_rows(df, 10, seed=3))
    assert first["instruction_id"].to_list() == sorted(first["instruction_id"].to_list())
    assert not first.equals(sample_rows(df, 10, seed=4))
    assert sample_rows(df, 0, seed=3).equals(df) and sample_rows(df, 80, seed=3).equals(df)
