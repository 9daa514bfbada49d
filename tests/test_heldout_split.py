import pytest

from assets.shared import effective_heldout_share, is_held_out

pytestmark = pytest.mark.unit

IDS = [f"run12345-{k:05d}-00" for k in range(12)]


def test_small_pool_holds_out_min_heldout_exactly():
    share = effective_heldout_share(IDS, 0.2, 6)
    assert sum(is_held_out(i, share) for i in IDS) == 6
    # Never more than half the pool.
    share = effective_heldout_share(IDS[:9], 0.2, 6)
    assert sum(is_held_out(i, share) for i in IDS[:9]) == 4


def test_large_pool_keeps_the_configured_share():
    ids = [f"run-{k:05d}" for k in range(2_000)]
    assert effective_heldout_share(ids, 0.2, 6) == 0.2
    assert 0.17 < sum(is_held_out(i, 0.2) for i in ids) / len(ids) < 0.23


def test_a_recorded_share_rechecked_on_a_grown_pool_holds_out_only_new_ids():
    share = effective_heldout_share(IDS, 0.2, 6)
    trained = {i for i in IDS if not is_held_out(i, share)}
    grown = IDS + [f"run67890-{k:05d}-00" for k in range(30)]
    assert not {i for i in grown if is_held_out(i, share)} & trained
    # A smaller share holds out a subset of a larger one's ids.
    assert {i for i in grown if is_held_out(i, 0.1)} <= {i for i in grown if is_held_out(i, 0.3)}


def test_empty_and_tiny_pools():
    assert effective_heldout_share([], 0.2, 6) == 0.2
    assert effective_heldout_share(["only-one"], 0.2, 6) == 0.2  # half of one is zero: nothing forced


def test_a_small_pool_is_never_wholly_held_out():
    under = [i for i in (f"run-{k:05d}" for k in range(500)) if is_held_out(i, 0.2)][:7]
    # Two ids whose hashes both fall under 0.2: the configured share would leave RL nothing to train on.
    ids = under[:2]
    assert len(ids) == 2
    share = effective_heldout_share(ids, 0.2, 6)
    assert sum(is_held_out(i, share) for i in ids) == 1
    lone = ids[:1]
    assert sum(is_held_out(i, effective_heldout_share(lone, 0.2, 6)) for i in lone) == 0
    # Seven ids all under the share: capped at half the pool.
    assert sum(is_held_out(i, effective_heldout_share(under, 0.2, 6)) for i in under) == 3
