"""The SFT validation slice (stable, disjoint from training, by instruction) and the per-epoch log."""

import math

import pytest

from refine_af_pipeline.training.matched_data import MatchedDataSettings, validation_ids
from refine_af_pipeline.training.sft import epoch_log, validation_never_improved
from refine_af_pipeline.training.splits import hash_bucket

pytestmark = pytest.mark.unit


def validation_split(ids, share, minimum):
    return validation_ids(ids, MatchedDataSettings(validation_share=share, min_validation=minimum))


def _ids(n: int, prefix: str = "run1") -> list[str]:
    return [f"{prefix}-{k:05d}-00" for k in range(n)]


def test_the_split_is_stable_and_depends_only_on_the_ids():
    ids = _ids(200)
    first = validation_split(ids, 0.15, 4)
    assert first == validation_split(list(reversed(ids)), 0.15, 4)  # order does not matter
    assert first == validation_split(ids + ids, 0.15, 4)  # several pairs per instruction: one side each
    assert 0.08 < len(first) / len(ids) < 0.22
    # A larger share keeps every instruction a smaller share held out, and a grown pool too.
    assert first <= validation_split(ids, 0.3, 4)
    assert first <= validation_split(ids + _ids(100, "run2"), 0.15, 4)


def test_the_slice_is_salted_apart_from_the_rl_heldout_split():
    ids = _ids(400)
    val = validation_split(ids, 0.2, 0)
    rl_heldout = {i for i in ids if hash_bucket(i) < 0.2 * 10_000}
    assert val != rl_heldout and len(val & rl_heldout) < 0.5 * len(val)


def test_small_pools_get_the_minimum_and_never_more_than_a_quarter():
    ids = _ids(16)
    assert len(validation_split(ids, 0.0, 4)) == 4
    assert len(validation_split(_ids(8), 0.0, 4)) == 2
    share_only = validation_split(_ids(80), 0.15, 0)  # no minimum: exactly the hash share
    assert share_only == {i for i in _ids(80) if hash_bucket(i, "sft-validation") < 0.15 * 10_000}
    assert len(validation_split(_ids(40), 0.6, 0)) == 10  # a share above a quarter is capped
    assert validation_split(_ids(16), 0.0, 4) < set(_ids(16))  # a strict subset: something is left to train on
    # A pool of 2 or 3 still gives one instruction to validation, so every arm reports a validation loss,
    # and one instruction alone stays in training.
    assert len(validation_split(_ids(2), 0.0, 4)) == 1
    assert len(validation_split(_ids(3), 0.0, 4)) == 1
    assert validation_split(_ids(3), 0.0, 0) == set()  # no minimum, no hash share: none
    assert validation_split(_ids(1), 0.0, 4) == set()


def test_epoch_log_means_the_steps_of_each_epoch_and_takes_the_validation_after_it():
    steps = [
        {"step": k, "loss": loss, "learning_rate": 1e-3, "epoch": k / 2}
        for k, loss in zip(range(1, 7), [2.0, 1.8, 1.6, 1.4, 1.3, 1.1])
    ]
    evals = [{"eval_loss": 1.9, "epoch": 1.0}, {"eval_loss": 1.7, "epoch": 2.0}, {"eval_loss": 1.75, "epoch": 3.0}]
    log = epoch_log(steps, evals, {"train": 2.2, "validation": 2.1})
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert [r["steps"] for r in log] == [0, 2, 4, 6]
    assert [r["train_loss"] for r in log] == pytest.approx([2.2, 1.9, 1.5, 1.2])
    assert [r["validation_loss"] for r in log] == [2.1, 1.9, 1.7, 1.75]
    assert not validation_never_improved(log)


def test_a_validation_loss_that_never_drops_below_its_start_is_flagged():
    flat = [{"validation_loss": v} for v in (1.5, 1.5, 1.6, 1.7)]
    assert validation_never_improved(flat)
    assert not validation_never_improved([{"validation_loss": v} for v in (1.5, 1.49)])
    assert not validation_never_improved([{"validation_loss": math.nan}, {"validation_loss": math.nan}])
