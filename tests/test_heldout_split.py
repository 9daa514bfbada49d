"""RL's held-out split: the pipeline's one stable split with RL's bounds (assets/shared.py)."""

import pytest

from assets.shared import rl_heldout_split
from refine_af_pipeline.training.splits import in_share

pytestmark = pytest.mark.unit

IDS = [f"run12345-{k:05d}-00" for k in range(12)]


def _held(ids, share):
    return {i for i in ids if in_share(i, share)}


def test_small_pool_holds_out_min_heldout_exactly():
    split = rl_heldout_split(IDS, 0.2, 6)
    assert len(split.held) == 6 and _held(IDS, split.share) == split.held
    # Never more than half the pool.
    split = rl_heldout_split(IDS[:9], 0.2, 6)
    assert len(_held(IDS[:9], split.share)) == 4


def test_large_pool_keeps_the_configured_share():
    ids = [f"run-{k:05d}" for k in range(2_000)]
    split = rl_heldout_split(ids, 0.2, 6)
    assert split.share == 0.2
    assert 0.17 < len(split.held) / len(ids) < 0.23


def test_a_recorded_share_rechecked_on_a_grown_pool_holds_out_only_new_ids():
    share = rl_heldout_split(IDS, 0.2, 6).share
    trained = set(IDS) - _held(IDS, share)
    grown = IDS + [f"run67890-{k:05d}-00" for k in range(30)]
    assert not _held(grown, share) & trained
    # A smaller share holds out a subset of a larger one's ids.
    assert _held(grown, 0.1) <= _held(grown, 0.3)


def test_empty_and_tiny_pools():
    assert rl_heldout_split([], 0.2, 6).share == 0.2
    assert rl_heldout_split(["only-one"], 0.2, 6).share == 0.2  # half of one is zero: nothing forced


def test_a_small_pool_is_never_wholly_held_out():
    under = [i for i in (f"run-{k:05d}" for k in range(500)) if in_share(i, 0.2)][:7]
    # Two ids whose hashes both fall under 0.2: the configured share would leave RL nothing to train on.
    ids = under[:2]
    assert len(ids) == 2
    assert len(_held(ids, rl_heldout_split(ids, 0.2, 6).share)) == 1
    lone = ids[:1]
    assert len(_held(lone, rl_heldout_split(lone, 0.2, 6).share)) == 0
    # Seven ids all under the share: capped at half the pool.
    assert len(_held(under, rl_heldout_split(under, 0.2, 6).share)) == 3
