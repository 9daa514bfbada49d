"""The rule of every check that states a conclusion on a comparison: pass only when the CI's low end
is above 0; otherwise warn, saying "cannot tell" (or "no") with the effect, its CI and n."""

import math

import pytest

from assets.evaluation import headline_conclusion
from refine_af_pipeline.evaluation.conclusion import ci_conclusion
from refine_af_pipeline.evaluation.task_comparison import compare_over_tasks

pytestmark = pytest.mark.unit


def test_a_ci_above_zero_passes():
    c = ci_conclusion("A beats B", 0.03, 0.004, 0.06, 40, unit="ROUGE-L", n_unit="tasks")
    assert c.passed and c.answer == "yes"
    assert "+0.0300 ROUGE-L" in c.description and "[+0.0040, +0.0600]" in c.description
    assert "n = 40 tasks" in c.description


@pytest.mark.parametrize("low", [-0.02, 0.0])  # a low end exactly on the line does not pass either
def test_a_ci_reaching_zero_cannot_tell(low):
    c = ci_conclusion("A beats B", 0.016, low, 0.052, 64)
    assert not c.passed and c.answer == "cannot tell"
    assert "cannot tell" in c.description and "includes 0" in c.description
    assert "+0.0160" in c.description and "+0.0520" in c.description and "n = 64" in c.description


def test_a_ci_below_zero_says_no():
    c = ci_conclusion("A beats B", -0.05, -0.09, -0.01, 30)
    assert not c.passed and c.answer == "no" and "no, the CI lies at or below 0" in c.description


def test_too_few_items_cannot_tell_even_with_a_ci_above_zero():
    c = ci_conclusion("A beats B", 0.5, 0.2, 0.8, 3, min_n=10, n_unit="seeds")
    assert not c.passed and c.answer == "cannot tell" and "fewer than 10 seeds" in c.description
    assert ci_conclusion("A beats B", 0.5, 0.2, 0.8, 10, min_n=10).passed


def test_a_nan_ci_cannot_tell():
    c = ci_conclusion("A beats B", math.nan, math.nan, math.nan, 0)
    assert not c.passed and c.answer == "cannot tell" and "not a number" in c.description


def _headline(candidate: list[float], reference: list[float]) -> dict:
    tasks = [f"task{i}" for i in range(len(candidate))]
    row = compare_over_tasks(
        dict(zip(tasks, candidate)), dict(zip(tasks, reference)), "refine_af", "self_instruct", resamples=2000
    )
    return row.as_dict()


def test_more_wins_than_losses_with_a_ci_straddling_zero_warns_cannot_tell():
    # 5 small wins, 4 large-ish losses: more wins than losses (the old rule passed), CI across 0.
    reference = [0.30] * 10
    candidate = [0.32, 0.33, 0.31, 0.34, 0.32, 0.27, 0.26, 0.28, 0.27, 0.30]
    headline = _headline(candidate, reference)
    assert headline["wins"] > headline["losses"]
    assert headline["mean_difference_ci_low"] < 0 < headline["mean_difference_ci_high"]
    c = headline_conclusion(headline)
    assert not c.passed and c.answer == "cannot tell"
    assert "cannot tell" in c.description and "n = 10 tasks" in c.description
    assert "wins/ties/losses 5/1/4" in c.description


def test_a_consistent_rouge_gain_passes():
    reference = [0.2, 0.3, 0.25, 0.4, 0.35, 0.3, 0.28, 0.22]
    candidate = [r + d for r, d in zip(reference, [0.05, 0.04, 0.06, 0.03, 0.05, 0.07, 0.02, 0.04])]
    headline = _headline(candidate, reference)
    assert headline["mean_difference_ci_low"] > 0
    c = headline_conclusion(headline)
    assert c.passed and c.answer == "yes" and "wins/ties/losses 8/0/0" in c.description
