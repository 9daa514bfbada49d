"""The verdict's bootstrap over seeds and items, and its yes / no / cannot-tell rule, on hand-made tables."""

import math

import numpy as np
import pytest

from refine_af_pipeline.evaluation.verdict import answer, crossed_bootstrap, difference_table, verdict_row

pytestmark = pytest.mark.unit


def test_crossed_bootstrap_matches_a_hand_computation_on_a_two_by_two_table():
    """x[s][i] = 1 + 4s + 2i. A resample's mean is 1 + 4 mean(s drawn) + 2 mean(i drawn); each of the
    two means is 0, 1/2, 1/2 or 1 with equal odds (variance 1/8), independently, so the standard
    error is sqrt(16/8 + 4/8) = 1.581. The extremes 1 and 7 each have probability 1/16 > 2.5%, so
    the 95% interval is exactly [1, 7]."""
    table = np.array([[1.0, 3.0], [5.0, 7.0]])
    mean, low, high, se = crossed_bootstrap(table, resamples=20_000, seed=1)
    assert mean == 4.0
    assert (low, high) == (1.0, 7.0)
    assert se == pytest.approx(math.sqrt(2.5), rel=0.03)


def test_seeds_add_their_spread_to_the_interval():
    rng = np.random.default_rng(0)
    items = rng.normal(0.05, 0.1, size=40)
    one_seed = crossed_bootstrap(items[None, :], resamples=4000)
    # Three replicates that disagree by +-0.1 on every item: the per-run CI would not see that.
    three = crossed_bootstrap(np.stack([items - 0.1, items, items + 0.1]), resamples=4000)
    assert three[0] == pytest.approx(one_seed[0])
    assert three[2] - three[1] > 1.5 * (one_seed[2] - one_seed[1])


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.3, 0.5, 0.4, 0.6, 0.2, 0.5], "yes"),
        ([-0.3, -0.5, -0.4, -0.6, -0.2, -0.5], "no"),
        ([0.002, -0.001, 0.001, -0.002, 0.0, 0.001], "no"),  # CI within the margin of 0.01: no effect that matters
        ([1.0, -1.0, 0.8, -0.9, 1.2, -1.1], "cannot tell"),  # the CI spans 0 and reaches large effects
    ],
)
def test_the_answer_on_hand_made_tables(values, expected):
    row = verdict_row("q", "a", "b", "m", "judge", np.array([values]), margin=0.01, resamples=4000)
    assert row.answer == expected
    assert row.n_items == 6 and row.n_seeds == 1
    assert row.ci95_low <= row.effect <= row.ci95_high
    assert row.min_detectable_difference > 0


def test_answer_boundaries():
    assert answer(0.001, 0.5, 0.01) == "yes"
    assert answer(-0.5, 0.009, 0.01) == "no"
    assert answer(-0.001, 0.01, 0.01) == "cannot tell"


def test_difference_table_pairs_models_per_seed_and_item():
    rows = [
        dict(model="a", task="t1", replicate=0, v=0.5),
        dict(model="b", task="t1", replicate=0, v=0.2),
        dict(model="a", task="t2", replicate=0, v=0.1),
        dict(model="b", task="t2", replicate=0, v=0.4),
        dict(model="a", task="t1", replicate=1, v=0.9),
        dict(model="b", task="t1", replicate=1, v=0.3),
    ]
    table = difference_table(rows, "a", "b", "v")
    assert table.shape == (2, 2)
    assert table[0].tolist() == pytest.approx([0.3, -0.3])
    assert table[1, 0] == pytest.approx(0.6) and math.isnan(table[1, 1])


def test_a_question_without_paired_items_cannot_be_told():
    row = verdict_row("q", "a", "b", "m", "judge", np.full((2, 3), np.nan), margin=0.01, resamples=100)
    assert row.answer == "cannot tell" and row.n_items == 0 and "no item" in row.note
    # A seed without any difference does not count as a seed.
    partial = verdict_row("q", "a", "b", "m", "judge", np.array([[0.3, 0.4, 0.5], [np.nan] * 3]), 0.01, resamples=500)
    assert partial.n_seeds == 1 and partial.n_items == 3


def test_each_seed_reports_its_own_effect_beside_the_pooled_one():
    # Seed 0 gains 0.2 on both items, seed 1 loses 0.1 on its only item (the other is missing).
    table = np.array([[0.2, 0.2], [-0.1, np.nan]])
    row = verdict_row("q", "a", "b", "m", "judge", table, margin=0.01, resamples=200)
    assert row.per_seed_effects == "+0.200 / -0.100"
    assert row.effect == pytest.approx(0.1)  # the pooled mean is over the three cells
