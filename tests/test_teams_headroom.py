"""The TeaMs-RL headroom table on a stub reviewer that rewards one operation in one state."""

import pytest

from refine_af_pipeline.teams.headroom import headroom

pytestmark = pytest.mark.unit


def test_headroom_finds_the_one_rewarded_operation_in_its_state():
    ops = ["breadth", "deepen", "concretize"]
    rows = []
    # The stub rewards deepen after breadth (1.0) and nothing else (0.0); states visited uniformly.
    for state in ("start", "after breadth", "after deepen"):
        for op in ops:
            for _ in range(10):
                reward = 1.0 if (state, op) == ("after breadth", "deepen") else 0.0
                rows.append(dict(state=state, operation=op, reward=reward))
    h = headroom(rows, ops)
    table = {r["state"]: r for r in h.per_state}
    assert table["after breadth"]["best_operation"] == "deepen" and table["after breadth"]["best_mean_reward"] == 1.0
    assert table["start"]["best_mean_reward"] == 0.0
    # deepen's mean over all states is 1/3; uniform is (0 + 1/3 + 0) / 3; best per state: 1 in a third of the states.
    assert h.best_fixed_operation == "deepen" and h.best_fixed == pytest.approx(1 / 3)
    assert h.uniform == pytest.approx(1 / 9)
    assert h.best_per_state == pytest.approx(1 / 3)
    assert h.headroom == pytest.approx(1 / 3 - 1 / 9)


def test_cells_with_too_few_transitions_are_left_out():
    rows = [dict(state="start", operation="a", reward=1.0)] * 2 + [dict(state="start", operation="b", reward=0.2)] * 5
    h = headroom(rows, ["a", "b"], min_count=3)
    assert h.per_state[0]["best_operation"] == "b" and h.per_state[0]["mean_reward_a"] is None
