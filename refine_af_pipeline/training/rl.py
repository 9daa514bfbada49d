"""RL from automated feedback: GRPO (default) or RLOO from TRL on a LoRA adapter.

The policy learns to write an input/output instance for an instruction; the reward is the
FeedbackScorer's combined score. beta > 0 keeps the policy near the base model (KL penalty; with
PEFT the reference is the base model with the adapter switched off, so no second copy is held).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..feedback.scores import COMPONENTS, FeedbackScorer
from ..llm.adapters import AdapterView
from ..llm.backend import render_prompt
from ..llm.prompts import INSTANCE_PREFIX, instance_prompt
from ..settings_types import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Share,
)
from .checkpoints import Checkpoints, step_counter, step_of, step_state_saver, with_epoch_seeded_sampler
from .distributed import accumulation_steps, gathered, is_main_process, world_size
from .rl_diagnostics import repeated_ngram_share
from .rollouts import processor_added, row_seeded_rollouts
from .trainer_setup import common_training_args, log_forwarder, lora_config, save_adapter


class RLSettings(BaseModel):
    """Settings of the RL stage (`rl_refined_policy`): trainer, step size, sampling, adapter, and the
    held-out split the check compares on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="TRL trainer, both on a LoRA adapter: GRPO or RLOO")
    max_steps: PositiveInt = Field(
        1_500,
        description=(
            "optimizer steps; each samples prompts_per_step x group_size completions (1,500 x 8: one pass over the "
            "12,000 instructions a 15,000 pool leaves after the 20% held out)"
        ),
    )
    prompts_per_step: PositiveInt = Field(8, description="instructions per optimizer step")
    group_size: PositiveInt = Field(4, description="completions per instruction, each rewarded relative to the others")
    train_batch_size: PositiveInt = Field(
        2,
        description=(
            "completions per forward/backward pass: a step's completions are generated in one batch and trained on "
            "this many at a time (gradient accumulation: same update, the memory of the slice); must divide "
            "prompts_per_step x group_size"
        ),
    )
    learning_rate: PositiveFloat = Field(
        1e-3,
        description=("LoRA learning rate; high so that a few steps move a small policy at all, lower it for long runs"),
    )
    beta: NonNegativeFloat = Field(0.04, description="KL penalty towards the base model (0 = none, no reference pass)")
    max_completion_length: PositiveInt = Field(
        DEFAULT_MAX_NEW_TOKENS,
        description=(
            "tokens per completion: the instance stages' max_new_tokens, so RL does not train on instances cut "
            "before their output ends"
        ),
    )
    temperature: PositiveFloat = Field(DEFAULT_TEMPERATURE, description="sampling temperature of the rollouts")
    top_p: Probability = Field(DEFAULT_TOP_P, description="nucleus sampling of the rollouts")
    lora_r: PositiveInt = Field(8, description="LoRA rank")
    lora_alpha: PositiveInt = Field(16, description="LoRA scaling numerator (scale = lora_alpha / lora_r)")
    seed: int = Field(0, description="trainer seed")
    checkpoint_every_steps: NonNegativeInt = Field(
        10,
        description=(
            "save a checkpoint every this many optimizer steps (0: none); a re-run of a killed step resumes from "
            "the last one with the same data order and reward records"
        ),
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (for 7B+ policies)"
    )
    use_vllm: bool = Field(
        False,
        description=(
            "generate the completions with vLLM colocated in the trainer's process (TRL's use_vllm, vllm_mode "
            "colocate): CUDA and `pip install '.[vllm]'` only; faster rollouts for 7B policies"
        ),
    )
    vllm_gpu_memory_utilization: Share = Field(0.3, description="with use_vllm: GPU memory share of the rollout engine")
    heldout_share: Share = Field(0.2, description="share of kept instructions (stable hash split) RL never trains on")
    min_heldout: NonNegativeInt = Field(
        6,
        description=(
            "hold out at least this many instructions, so the held-out check has some; a small pool never has more "
            "than half held out, so RL has some to train on"
        ),
    )

    @model_validator(mode="after")
    def _slices_fill_a_step(self):
        completions = self.prompts_per_step * self.group_size
        if completions % self.train_batch_size:
            raise ValueError(
                f"train_batch_size ({self.train_batch_size}) must divide prompts_per_step x group_size ({completions})"
            )
        return self


@dataclass
class RLResult:
    adapter_dir: Path
    log: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0  # the checkpoint's step a re-run went on from (0: trained from the start)
    steps_taken: int = 0  # optimizer steps this call took
    world_size: int = 1  # processes that trained the adapter together


class _RewardRecorder:
    """The TRL reward function; also remembers per-call component means, gate failures and the
    repeated-n-gram share of the completions (a degenerate-output indicator)."""

    __name__ = "automated_feedback"

    def __init__(self, scorer: FeedbackScorer, max_completion_length: int, end_ids: set[int]):
        self.scorer = scorer
        self.max_completion_length = max_completion_length
        self.end_ids = end_ids
        self.calls: list[dict] = []

    def __call__(
        self, prompts, completions, instruction, is_classification=None, completion_ids=None, **_
    ) -> list[float]:
        # The prompt ends inside the assistant turn with INSTANCE_PREFIX; completions continue it.
        completions = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        # A completion that filled its token budget without an end token was cut: the same gate as
        # the instance stages' hit_token_limit.
        cut = (
            [
                len(ids) >= self.max_completion_length and (not ids or int(ids[-1]) not in self.end_ids)
                for ids in completion_ids
            ]
            if completion_ids is not None
            else None
        )
        scored = self.scorer.score_texts(
            list(instruction), [INSTANCE_PREFIX + c for c in completions], cut, is_classification
        )
        # Under several processes each scores its share of the step: the record is over all of them.
        every = gathered(
            [
                (s.gate_reason is not None, repeated_ngram_share(c), s.components)
                for s, c in zip(scored, completions, strict=True)
            ]
        )
        record = {
            "gate_failure_share": sum(failed for failed, _, _ in every) / max(len(every), 1),
            "repeat_share": sum(share for _, share, _ in every) / max(len(every), 1),
        }
        for name in COMPONENTS:
            values = [parts[name] for _, _, parts in every if parts[name] is not None]
            record[f"{name}_mean"] = sum(values) / len(values) if values else math.nan
        self.calls.append(record)
        return [s.reward for s in scored]


def train_policy(
    model,
    tokenizer,
    instructions: Sequence[str],
    scorer: FeedbackScorer,
    settings: RLSettings,
    output_dir: Path,
    device: str,
    on_log=None,
    base_view: AdapterView | None = None,
    is_classification: Sequence[bool] | None = None,
    checkpoints: Checkpoints | None = None,
) -> RLResult:
    """Train a LoRA adapter on `model`. `base_view`, if given (the scorer's judge), is bound to the
    trainer's PEFT model, so the judge reads the base weights with the adapter off: one copy of the
    weights serves policy, reference and judge. `is_classification` (per instruction) turns on the
    gate's label check for those instructions. With `checkpoints`, saves every N steps there and
    resumes from the last complete checkpoint found (the folder is removed once the adapter is saved)."""
    from datasets import Dataset

    if not instructions:
        raise ValueError("no instructions to train the RL policy on")
    if settings.use_vllm and not device.startswith("cuda"):
        raise ValueError(f"use_vllm needs a CUDA device (the policy is on {device}); set it false")
    completions_per_step = settings.prompts_per_step * settings.group_size
    # GRPO/RLOO draw prompts_per_step prompts per step and drop an incomplete step: with fewer
    # instructions than that, TRL would train zero steps without an error. Cycle them up to one step.
    instructions = list(instructions)
    classification = (
        [bool(c) for c in is_classification] if is_classification is not None else [False] * len(instructions)
    )
    if len(classification) != len(instructions):
        raise ValueError(f"is_classification has {len(classification)} flags for {len(instructions)} instructions")
    while len(instructions) < settings.prompts_per_step:
        missing = settings.prompts_per_step - len(instructions)
        instructions, classification = instructions + instructions[:missing], classification + classification[:missing]
    dataset = Dataset.from_dict(
        {
            "prompt": [rl_prompt(tokenizer, i) for i in instructions],
            "instruction": instructions,
            "is_classification": classification,
        }
    )
    args = dict(
        common_training_args(output_dir, settings.seed, device, checkpoints),
        max_steps=settings.max_steps,
        # One generate call per optimizer step for all its completions (the large batch is where
        # generation is fast); the backward passes go through them train_batch_size at a time.
        per_device_train_batch_size=settings.train_batch_size,
        gradient_accumulation_steps=accumulation_steps(
            completions_per_step, settings.train_batch_size, "prompts_per_step x group_size"
        ),
        num_generations=settings.group_size,
        max_completion_length=settings.max_completion_length,
        learning_rate=settings.learning_rate,
        beta=settings.beta,
        temperature=settings.temperature,
        top_p=settings.top_p,
        # Checkpointing trades compute for memory; a 135M policy does not need it.
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    if settings.use_vllm:
        args.update(
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=settings.vllm_gpu_memory_utilization
        )
    if settings.algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        # Advantages scaled by the spread of the whole step, not of each group: with 4 completions
        # a group whose rewards happen to be close (std ~0.1 against ~1 across groups) would have
        # its noise amplified tenfold.
        args["scale_rewards"] = "batch"
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        args["normalize_advantages"] = True  # the same scale, over the step's completions
    recorder = _RewardRecorder(scorer, settings.max_completion_length, _end_token_ids(model, tokenizer))
    counter = step_counter()
    callbacks = [log_forwarder(on_log), counter]
    resume = checkpoints.latest() if checkpoints is not None else None
    if checkpoints is not None:
        if resume is not None:
            recorder.calls = checkpoints.read_state(step_of(resume))["reward_calls"]
        callbacks.append(step_state_saver(checkpoints, lambda: {"reward_calls": recorder.calls}))
    trainer = with_epoch_seeded_sampler(Trainer, settings.seed)(
        model=model,
        reward_funcs=[recorder],
        args=Config(**args),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora_r, settings.lora_alpha),
        callbacks=callbacks,
    )
    if base_view is not None:
        base_view.bind(trainer.model)
    # Installed first, so its draw runs after the nucleus processor sort_free_rollouts adds.
    with row_seeded_rollouts(trainer, settings.seed), sort_free_rollouts(trainer, settings.top_p, settings.temperature):
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    adapter_dir = save_adapter(trainer, tokenizer, output_dir)
    if checkpoints is not None and is_main_process():
        checkpoints.discard()
    return RLResult(
        adapter_dir,
        _training_log(trainer.state.log_history, recorder.calls),
        step_of(resume) if resume is not None else 0,
        counter.taken,
        world_size(),
    )


@contextmanager
def sort_free_rollouts(trainer, top_p: float, temperature: float) -> Iterator[bool]:
    """Inside, TRL samples rollouts with the sort-free nucleus processor (llm/sampling.py) in
    place of transformers' temperature and top-p warpers, which sort the vocabulary at every step:
    the trainer's generation temperature and top_p become 1.0 and the processor, which applies
    both, is added to the policy's generate calls (transformers runs a caller's processors before
    its own warpers). The trainer's own temperature, which scales the logits it trains on, is left
    alone. Yields False, changing nothing, where the trainer does not sample with model.generate
    (vLLM rollouts). The policy's generate is restored on exit."""
    from refine_af_pipeline.llm.sampling import nucleus_logits_processor

    config = getattr(trainer, "generation_config", None)
    if config is None or (top_p >= 1.0 and temperature == 1.0):
        yield False
        return
    config.top_p, config.temperature = 1.0, 1.0
    if isinstance(getattr(trainer, "generation_kwargs", None), dict):
        trainer.generation_kwargs.update(top_p=1.0, temperature=1.0)
    processor = nucleus_logits_processor(top_p, temperature)
    with processor_added(trainer.model, lambda *args, **kwargs: processor):
        yield True


def _end_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion: the generation config's eos ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def rl_prompt(tokenizer, instruction: str) -> str:
    """The exact text the instance-generation stage prompts with, so RL trains the policy on the
    prompt it is later used with. A plain string, not chat messages: TRL 1.16 renders chat prompts
    with add_generation_prompt=True, which would close the assistant turn holding INSTANCE_PREFIX
    and open a fresh, empty one."""
    text = render_prompt(tokenizer, instance_prompt(instruction), INSTANCE_PREFIX)
    # TRL tokenizes string prompts with special tokens; avoid a doubled BOS where the template has one.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
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
