"""RL on fewer kept instructions than one step's prompts still trains (TRL would run zero steps)."""

import math

import pytest
from learned_reward_fixture import write_learned_reward

from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source
from refine_af_pipeline.llm.transformers_backend import TransformersModel
from refine_af_pipeline.training.rl import RLSettings, train_policy
from resources import FeedbackScorerResource

pytestmark = pytest.mark.graph


def test_one_instruction_still_gives_a_training_step(tiny_model_dir, tmp_path):
    source = resolve_model_source(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    scorer = FeedbackScorerResource().build(
        TransformersModel(load_causal_lm(source, "cpu", None), tokenizer, "tiny"),
        "cpu",
        batch_size=8,
        learned_reward_dir=str(write_learned_reward(tmp_path / "learned_reward")),
    )
    settings = RLSettings(max_steps=1, prompts_per_step=2, group_size=2, max_completion_length=16)
    result = train_policy(
        load_causal_lm(source, "cpu", None),
        tokenizer,
        ["Describe a quiet river garden"],
        scorer,
        settings,
        tmp_path,
        "cpu",
    )
    assert [row["step"] for row in result.log] == [1]
    assert math.isfinite(result.log[0]["reward"])
