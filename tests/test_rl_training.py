"""The RL trainer on the tiny Llama: RLOO runs with TRL 1.16, and RL prompts are the inference prompts."""

import math

import pytest

from refine_af_pipeline.llm.backend import render_prompt
from refine_af_pipeline.llm.prompts import INSTANCE_PREFIX, instance_prompt
from refine_af_pipeline.llm.transformers_backend import TransformersModel
from refine_af_pipeline.training.rl import RLSettings, rl_prompt, train_policy

pytestmark = pytest.mark.graph

INSTRUCTIONS = [
    "Describe a quiet river garden",
    "List three useful habits for every student",
    "Compare two ancient bridges",
    "Suggest a simple recipe for a team",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from refine_af_pipeline.llm.models import load_tokenizer, resolve_model_source

    source = resolve_model_source(str(tiny_model_dir))
    return source, load_tokenizer(source)


def test_rl_prompt_is_the_instance_generation_prompt(loaded):
    _, tokenizer = loaded
    for instruction in INSTRUCTIONS:
        text = rl_prompt(tokenizer, instruction)
        assert text == render_prompt(tokenizer, instance_prompt(instruction), INSTANCE_PREFIX)
        # The policy continues the open assistant turn right after "Input:", not a fresh turn.
        assert text.endswith("<|im_start|>assistant\n" + INSTANCE_PREFIX)


def test_one_rloo_step_trains_and_logs(loaded, tmp_path):
    from refine_af_pipeline.llm.models import load_causal_lm
    from resources import FeedbackScorerResource

    source, tokenizer = loaded
    judge = load_causal_lm(source, "cpu", None)
    from learned_reward_fixture import write_learned_reward

    scorer = FeedbackScorerResource().build(
        TransformersModel(judge, tokenizer, "tiny"),
        "cpu",
        batch_size=8,
        learned_reward_dir=str(write_learned_reward(tmp_path / "learned_reward")),
    )
    policy = load_causal_lm(source, "cpu", None)
    settings = RLSettings(algorithm="rloo", max_steps=1, prompts_per_step=2, group_size=2, max_completion_length=16)
    result = train_policy(policy, tokenizer, INSTRUCTIONS, scorer, settings, tmp_path, "cpu")
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    [row] = result.log
    assert row["step"] == 1 and math.isfinite(row["reward"])
    for column in [
        "kl",
        "completion_length",
        "clipped_share",
        "gate_failure_share",
        "repeat_share",
        "preference_mean",
        "naturalness_mean",
        "coherence_mean",
        "understandability_mean",
    ]:
        assert column in row, column
    assert 0.0 <= row["clipped_share"] <= 1.0 and 0.0 <= row["repeat_share"] <= 1.0
    assert 0 < row["completion_length"] <= 16


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match=r"algorithm\n  Input should be 'grpo' or 'rloo'"):
        RLSettings(algorithm="ppo")


def test_vllm_rollouts_are_refused_off_cuda(tmp_path):
    with pytest.raises(ValueError, match="use_vllm needs a CUDA device .* on cpu"):
        train_policy(None, None, ["Describe a garden"], None, RLSettings(use_vllm=True), tmp_path, "cpu")


def test_rollouts_sample_the_nucleus_without_transformers_warpers(loaded):
    """Inside sort_free_rollouts the trainer's generate samples from the temperature-scaled top-p
    nucleus of each step's raw logits, computed by the sort-free processor, with transformers' own
    temperature and top-p warpers off; on exit the policy's generate is its own again."""
    from types import SimpleNamespace

    import torch
    from transformers import GenerationConfig, TemperatureLogitsWarper, TopPLogitsWarper

    from refine_af_pipeline.llm.models import load_causal_lm
    from refine_af_pipeline.training.rl import sort_free_rollouts

    source, tokenizer = loaded
    model = load_causal_lm(source, "cpu", None)
    config = GenerationConfig(
        max_new_tokens=12,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    trainer = SimpleNamespace(
        generation_config=config, generation_kwargs={"top_p": 0.9, "temperature": 0.7}, model=model
    )
    warper_calls = []
    real = {cls: cls.__call__ for cls in (TopPLogitsWarper, TemperatureLogitsWarper)}
    for cls in real:
        cls.__call__ = lambda self, *a, _cls=cls: warper_calls.append(_cls) or real[_cls](self, *a)
    try:
        with sort_free_rollouts(trainer, 0.9, 0.7) as installed:
            assert installed and (config.top_p, config.temperature) == (1.0, 1.0)
            assert trainer.generation_kwargs == {"top_p": 1.0, "temperature": 1.0}
            enc = tokenizer(
                [rl_prompt(tokenizer, i) for i in INSTRUCTIONS], return_tensors="pt", padding=True, padding_side="left"
            )
            torch.manual_seed(0)
            out = model.generate(**enc, generation_config=config)
    finally:
        for cls, call in real.items():
            cls.__call__ = call
    assert not warper_calls
    assert "generate" not in model.__dict__  # restored
    new_tokens = out.sequences[:, enc["input_ids"].shape[1] :]
    ended = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    masked_somewhere = False
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        allowed = torch.isfinite(scores)
        # The nucleus transformers' warpers keep: temperature, then top-p, over the raw logits.
        nucleus = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())) > float("-inf")
        running = [r for r in range(len(new_tokens)) if not ended & set(new_tokens[r, :step].tolist())]
        for r in running:
            assert torch.equal(allowed[r], nucleus[r]), (step, r)
            assert allowed[r, new_tokens[r, step]]
        masked_somewhere |= bool((~allowed[running]).any())
    assert masked_somewhere
    with sort_free_rollouts(SimpleNamespace(model=model), 0.9, 0.7) as installed:  # vLLM rollouts
        assert not installed
