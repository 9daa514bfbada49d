"""Best-of-N keeps the highest-reward candidate of each instance and records the others."""

import pytest

from refine_af_pipeline.instructions.instances import choose_best

pytestmark = pytest.mark.unit


def test_the_maximum_is_chosen_per_instance_and_every_candidate_stays():
    rows = [
        dict(instance_id="a-0", candidate_index=0, reward=0.2),
        dict(instance_id="a-0", candidate_index=1, reward=1.4),
        dict(instance_id="a-0", candidate_index=2, reward=-3.0),
        dict(instance_id="a-1", candidate_index=0, reward=-3.0),
        dict(instance_id="a-1", candidate_index=1, reward=-3.0),
        dict(instance_id="b-0", candidate_index=0, reward=0.5),
        dict(instance_id="b-0", candidate_index=1, reward=0.5),
    ]
    chosen = choose_best(rows)
    assert len(chosen) == len(rows)
    assert chosen == [False, True, False, True, False, True, False]  # a tie keeps the first candidate


def test_one_candidate_per_instance_keeps_every_row():
    rows = [dict(instance_id=f"x-{k}", candidate_index=0, reward=float(k)) for k in range(4)]
    assert choose_best(rows) == [True] * 4


def test_filters_run_on_chosen_rows_within_each_replicate():
    from refine_af_pipeline.instructions.instances import choose_and_filter

    def row(iid, rep, cand, reward, output, gate=None):
        return dict(
            instance_id=iid,
            replicate=rep,
            candidate_index=cand,
            reward=reward,
            instruction="Add.",
            input="2 and 3",
            output=output,
            gate_reason=gate,
        )

    rows = [
        row("a-0", 0, 0, 1.0, "5"),
        row("a-0", 0, 1, 0.5, "6"),  # best: "5"
        row("a-1", 0, 0, 0.9, "five"),  # same input, another output in replicate 0: a conflict
        row("a-0-r1", 1, 0, 1.0, "5"),
        row("a-1-r1", 1, 0, -3.0, "", "empty_output"),
    ]
    chosen, reasons = choose_and_filter(rows)
    assert chosen == [True, False, True, True, True]
    assert reasons == [
        "conflicting_outputs_for_same_input",
        "not_best_of_n",
        "conflicting_outputs_for_same_input",
        None,
        "empty_output",
    ]  # replicate 1's "5" conflicts with nothing in its own draw


def test_a_passing_candidate_is_chosen_over_a_gated_one_whatever_the_rewards():
    rows = [
        dict(instance_id="a-0", candidate_index=0, reward=-3.0, gate_reason="output_cut_at_token_limit"),
        dict(instance_id="a-0", candidate_index=1, reward=-3.7, gate_reason=None),
    ]
    assert choose_best(rows) == [False, True]
