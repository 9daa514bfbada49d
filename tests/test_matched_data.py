"""Equal-size SFT draws: the same ids across arms that share the pool, stable across runs, shortfalls named."""

import random

import pytest

from refine_af_pipeline.training.matched_data import MatchedDataSettings, draw_matched

pytestmark = pytest.mark.unit


def _pairs(instructions, per_instruction, prefix=""):
    return [
        dict(instance_id=f"{prefix}{i}-{j}", instruction_id=f"{prefix}{i}")
        for i in instructions
        for j in range(per_instruction)
    ]


def _ids(rows, key="instance_id"):
    return [r[key] for r in rows]


def test_sharing_arms_get_equal_sizes_and_the_same_instructions():
    # REFINE-AF kept 40 instructions x 2, Self-Instruct only 30 of them (x 2) plus 5 of its own.
    refine = _pairs(range(40), 2)
    selfi = _pairs(range(30), 2) + _pairs(range(100, 105), 2)
    teams = _pairs(range(50), 1, prefix="t")
    draws = draw_matched(
        {"refine_af": refine, "self_instruct": selfi, "teams_rl": teams},
        {"refine_af", "self_instruct"},
        MatchedDataSettings(sft_pairs=20, validation_share=0.15),
    )
    assert {len(d.train) for d in draws.values()} == {20}
    # The sharing arms validate on equally many pairs; TeaMs-RL gets that many, or fewer and is short.
    target = draws["refine_af"].target_validation
    assert len(draws["refine_af"].validation) == len(draws["self_instruct"].validation) == target > 0
    assert len(draws["teams_rl"].validation) == target or draws["teams_rl"].short
    train_sets = {a: set(_ids(d.train, "instruction_id")) for a, d in draws.items()}
    # 20 pairs from instructions both kept, one per instruction first: the same 20 instructions.
    assert train_sets["refine_af"] == train_sets["self_instruct"] and len(train_sets["refine_af"]) == 20
    assert draws["refine_af"].shared_train_instructions == 20
    # Validation: the same held-out instructions for both (one hash split of those both kept).
    held = {a: set(_ids(d.validation, "instruction_id")) for a, d in draws.items() if a != "teams_rl"}
    assert held["refine_af"] == held["self_instruct"] and held["refine_af"] <= {str(k) for k in range(30)}
    # No instruction is on both sides of one arm's split.
    for d in draws.values():
        assert not set(_ids(d.train, "instruction_id")) & set(_ids(d.validation, "instruction_id"))
    assert not draws["refine_af"].short and not draws["self_instruct"].short


def test_draw_is_stable_across_runs_and_input_order():
    arms = {"a": _pairs(range(30), 2), "b": _pairs(range(25), 2)}
    settings = MatchedDataSettings(sft_pairs=15)
    first = draw_matched(arms, {"a", "b"}, settings)
    shuffled = {k: random.Random(7).sample(v, len(v)) for k, v in arms.items()}
    again = draw_matched(shuffled, {"a", "b"}, settings)
    for arm in arms:
        assert _ids(first[arm].train) == _ids(again[arm].train)
        assert _ids(first[arm].validation) == _ids(again[arm].validation)


def test_sizes_come_from_the_sharing_arms_and_an_arm_outside_the_pool_is_named_short():
    arms = {"a": _pairs(range(30), 2), "c": _pairs(range(20), 1), "b": _pairs(range(6), 1, prefix="b")}
    default = draw_matched(arms, {"a", "c"}, MatchedDataSettings(validation_share=0.0, min_validation=0))
    # The smallest sharing arm (c: 20 pairs) sets the size; b, outside the pool, has 6 and is short.
    assert len(default["a"].train) == len(default["c"].train) == 20 and not default["a"].short
    assert len(default["b"].train) == 6 and default["b"].short
    # Round-robin: twenty different instructions before any second pair.
    assert len(set(_ids(default["a"].train, "instruction_id"))) == 20
    big = draw_matched(arms, {"a", "c"}, MatchedDataSettings(sft_pairs=40, validation_share=0.0, min_validation=0))
    assert len(big["a"].train) == 40 and len(big["c"].train) == 20
    assert big["c"].short and not big["a"].short


def test_an_arm_without_pairs_is_an_error_naming_it():
    with pytest.raises(ValueError, match="teams_rl"):
        draw_matched({"refine_af": _pairs(range(3), 1), "teams_rl": []}, {"refine_af"}, MatchedDataSettings())
