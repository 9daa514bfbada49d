"""RL from automated feedback: GRPO (default) or RLOO from TRL on a LoRA adapter.

The policy learns to write an input/output instance for an instruction; the reward is the
FeedbackScorer's combined score. beta > 0 keeps the policy near the base model (KL penalty; with
PEFT the reference is the base model with the adapter switched off, so no second copy is held).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import AdapterView
from .feedback import COMPONENTS, FeedbackScorer
from .generation import render_prompt
from .prompts import INSTANCE_PREFIX, instance_prompt
from .rl_diagnostics import mean_repeat_share
from .trainer_setup import common_training_args, log_forwarder, lora_config, save_adapter


@dataclass
class RLSettings:
    algorithm: str = "grpo"  # grpo | rloo
    max_steps: int = 3
    prompts_per_step: int = 3
    group_size: int = 4  # completions per prompt, compared with each other
    # Completions per forward/backward pass: a step's prompts_per_step x group_size completions are
    # generated in one batch and trained on in slices of this size (gradient accumulation).
    train_batch_size: int = 2
    learning_rate: float = 1e-3
    beta: float = 0.04  # KL coefficient
    max_completion_length: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    gradient_checkpointing: bool = False  # turn on for 7B+ policies that do not fit otherwise


@dataclass
class RLResult:
    adapter_dir: Path
    log: list[dict] = field(default_factory=list)


class _RewardRecorder:
    """The TRL reward function; also remembers per-call component means, gate failures and the
    repeated-n-gram share of the completions (a degenerate-output indicator)."""

    __name__ = "automated_feedback"

    def __init__(self, scorer: FeedbackScorer):
        self.scorer = scorer
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, instruction, **_) -> list[float]:
        # The prompt ends inside the assistant turn with INSTANCE_PREFIX; completions continue it.
        completions = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scored = self.scorer.score_texts(list(instruction), [INSTANCE_PREFIX + c for c in completions])
        record = {"gate_failure_share": sum(s.gate_reason is not None for s in scored) / max(len(scored), 1),
                  "repeat_share": mean_repeat_share(completions)}
        for name in COMPONENTS:
            values = [s.components[name] for s in scored if s.components[name] is not None]
            record[f"{name}_mean"] = sum(values) / len(values) if values else math.nan
        self.calls.append(record)
        return [s.reward for s in scored]


def train_policy(model, tokenizer, instructions: Sequence[str], scorer: FeedbackScorer, settings: RLSettings,
                 output_dir: Path, device: str, on_log=None, base_view: AdapterView | None = None) -> RLResult:
    """Train a LoRA adapter on `model`. `base_view`, if given (the scorer's judge), is bound to the
    trainer's PEFT model, so the judge reads the base weights with the adapter off: one copy of the
    weights serves policy, reference and judge."""
    from datasets import Dataset

    if settings.algorithm not in ("grpo", "rloo"):
        raise ValueError(f"unknown RL algorithm '{settings.algorithm}' (use grpo or rloo)")
    if not instructions:
        raise ValueError("no instructions to train the RL policy on")
    completions_per_step = settings.prompts_per_step * settings.group_size
    if completions_per_step % settings.train_batch_size:
        raise ValueError(f"train_batch_size ({settings.train_batch_size}) must divide prompts_per_step x group_size "
                         f"({completions_per_step})")
    # GRPO/RLOO draw prompts_per_step prompts per step and drop an incomplete step: with fewer
    # instructions than that, TRL would train zero steps without an error. Cycle them up to one step.
    instructions = list(instructions)
    while len(instructions) < settings.prompts_per_step:
        instructions += instructions[: settings.prompts_per_step - len(instructions)]
    dataset = Dataset.from_dict({
        "prompt": [rl_prompt(tokenizer, i) for i in instructions],
        "instruction": instructions,
    })
    args = dict(
        common_training_args(output_dir, settings.seed, device),
        max_steps=settings.max_steps,
        # One generate call per optimizer step for all its completions (the large batch is where
        # generation is fast); the backward passes go through them train_batch_size at a time.
        per_device_train_batch_size=settings.train_batch_size,
        gradient_accumulation_steps=completions_per_step // settings.train_batch_size,
        num_generations=settings.group_size,
        max_completion_length=settings.max_completion_length,
        learning_rate=settings.learning_rate,
        beta=settings.beta,
        temperature=settings.temperature,
        top_p=settings.top_p,
        # Checkpointing trades compute for memory; a 135M policy does not need it.
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    if settings.algorithm == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer

        # Advantages scaled by the spread of the whole step, not of each group: with 4 completions
        # a group whose rewards happen to be close (std ~0.1 against ~1 across groups) would have
        # its noise amplified tenfold.
        args["scale_rewards"] = "batch"
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

        args["normalize_advantages"] = True  # the same scale, over the step's completions
    recorder = _RewardRecorder(scorer)
    trainer = Trainer(
        model=model,
        reward_funcs=[recorder],
        args=Config(**args),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora_r, settings.lora_alpha),
        callbacks=[log_forwarder(on_log)],
    )
    if base_view is not None:
        base_view.bind(trainer.model)
    trainer.train()
    return RLResult(save_adapter(trainer, tokenizer, output_dir), _training_log(trainer.state.log_history, recorder.calls))


def rl_prompt(tokenizer, instruction: str) -> str:
    """The exact text the instance-generation stage prompts with, so RL trains the policy on the
    prompt it is later used with. A plain string, not chat messages: TRL 1.16 renders chat prompts
    with add_generation_prompt=True, which would close the assistant turn holding INSTANCE_PREFIX
    and open a fresh, empty one."""
    text = render_prompt(tokenizer, instance_prompt(instruction), INSTANCE_PREFIX)
    # TRL tokenizes string prompts with special tokens; avoid a doubled BOS where the template has one.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def _training_log(history: list[dict], calls: list[dict]) -> list[dict]:
    rows = []
    step_logs = [h for h in history if "reward" in h]
    for k, h in enumerate(step_logs):
        row = {
            "step": int(h.get("step", k + 1)),
            "reward": float(h["reward"]),
            "reward_std": float(h.get("reward_std", math.nan)),
            "kl": float(h.get("kl", math.nan)),
            "loss": float(h.get("loss", math.nan)),
            "completion_length": float(h.get("completions/mean_length", math.nan)),
            # Share of completions cut at max_completion_length: a length blow-up shows here first.
            "clipped_share": float(h.get("completions/clipped_ratio", math.nan)),
            "entropy": float(h.get("entropy", math.nan)),
        }
        row.update(calls[k] if k < len(calls) else {})
        rows.append(row)
    return rows
