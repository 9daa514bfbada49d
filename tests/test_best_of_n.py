"""Best-of-N keeps the highest-reward candidate of each instance and records the others."""

from refine_af_pipeline.instructions.instances import choose_best


def test_the_maximum_is_chosen_per_instance_and_every_candidate_stays():
    rows = [dict(instance_id="a-0", candidate_index=0, reward=0.2), dict(instance_id="a-0", candidate_index=1, reward=1.4),
            dict(instance_id="a-0", candidate_index=2, reward=-3.0), dict(instance_id="a-1", candidate_index=0, reward=-3.0),
            dict(instance_id="a-1", candidate_index=1, reward=-3.0), dict(instance_id="b-0", candidate_index=0, reward=0.5),
            dict(instance_id="b-0", candidate_index=1, reward=0.5)]
    chosen = choose_best(rows)
    assert len(chosen) == len(rows)
    assert chosen == [False, True, False, True, False, True, False]  # a tie keeps the first candidate


def test_one_candidate_per_instance_keeps_every_row():
    rows = [dict(instance_id=f"x-{k}", candidate_index=0, reward=float(k)) for k in range(4)]
    assert choose_best(rows) == [True] * 4
