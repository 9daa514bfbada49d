import math

import pytest

from refine_af_pipeline.feedback.gates import DEFAULT_GATE_REWARD
from refine_af_pipeline.feedback.scores import ComponentStats, combine, flesch_score
from refine_af_pipeline.instructions.instances import filter_reason

pytestmark = pytest.mark.unit


def test_standardisation_uses_base_mean_and_std():
    rows = [
        dict(preference=p, naturalness=0.5, coherence=c, understandability=0.2)
        for p, c in [(0.2, 0.1), (0.4, 0.3), (0.6, 0.5)]
    ]
    stats = ComponentStats.from_rows(rows)
    assert stats.mean["preference"] == pytest.approx(0.4)
    assert stats.std["preference"] == pytest.approx(0.2)
    assert stats.std["naturalness"] == 1.0  # constant component: spread treated as 1
    weights = {"preference": 1.0, "coherence": 0.5}
    reward = combine(
        dict(preference=0.6, naturalness=0.5, coherence=0.1, understandability=0.2), stats, weights, bias=0.25
    )
    assert reward == pytest.approx(0.25 + 1.0 * 1.0 + 0.5 * (-1.0))


def test_better_components_give_higher_reward():
    stats = ComponentStats(mean={"preference": 0.5, "coherence": 0.5}, std={"preference": 0.1, "coherence": 0.1})
    w = {"preference": 1.0, "coherence": 0.5}
    good = combine({"preference": 0.8, "coherence": 0.7}, stats, w)
    bad = combine({"preference": 0.3, "coherence": 0.4}, stats, w)
    assert good > bad
    assert bad > DEFAULT_GATE_REWARD


def test_readability_prefers_plain_text():
    plain = "The cat sat on the mat. It was a warm day."
    dense = (
        "Notwithstanding considerable epistemological ramifications, "
        "institutional stakeholders reconceptualized paradigms."
    )
    assert flesch_score(plain) > flesch_score(dense)
    assert 0.0 <= flesch_score(dense) <= 1.0


def test_conflicting_outputs_for_same_input_are_dropped():
    rows = [
        dict(instruction="Add", input="2 2", output="4", gate_reason=None),
        dict(instruction="Add", input="2  2", output="5", gate_reason=None),
        dict(instruction="Add", input="1 1", output="2", gate_reason=None),
        dict(instruction="Add", input="", output="", gate_reason="empty_output"),
    ]
    assert filter_reason(rows) == [
        "conflicting_outputs_for_same_input",
        "conflicting_outputs_for_same_input",
        None,
        "empty_output",
    ]


def test_stats_ignore_missing_components():
    stats = ComponentStats.from_rows(
        [dict(preference=None, naturalness=math.nan, coherence=0.5, understandability=1.0)]
    )
    assert stats.mean["preference"] == 0.0 and stats.std["preference"] == 1.0
