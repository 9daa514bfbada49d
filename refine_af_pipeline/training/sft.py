"""Supervised fine-tuning on (instruction, input, output) triples: TRL SFTTrainer with LoRA.

Prompt/completion records (Alpaca-style prompt, output as completion) so the loss covers only the
response tokens. A validation slice (chosen by the caller, see `validation_split`) is scored before
training and after every epoch, so the log shows whether the model learnt anything that carries
over to pairs it did not train on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..llm.prompts import sft_prompt
from ..settings_types import NonNegativeInt, PositiveFloat, PositiveInt
from .checkpoints import Checkpoints, step_counter, step_of, step_state_saver, with_epoch_seeded_sampler
from .distributed import accumulation_steps, is_main_process, world_size
from .trainer_setup import common_training_args, log_forwarder, lora_config, save_adapter

VALIDATION_SALT = "sft-validation"


class SFTSettings(BaseModel):
    """Settings of supervised fine-tuning (`finetuned_model`, `selfinstruct_finetuned_model`,
    `bestofn_finetuned_model`, `teams_finetuned_model`: each reads its own copy; keep them equal
    for a fair comparison). A LoRA adapter on a few
    dozen pairs needs tens of optimizer steps at a high learning rate to move the model at all;
    small batches give more steps for the same compute, and the validation loss shows when more
    epochs start to overfit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: PositiveFloat = Field(
        3.0, description=("passes over the training pairs (fractions allowed); 3 as in Alpaca's fine-tuning recipe")
    )
    batch_size: PositiveInt = Field(4, description="pairs per optimizer step")
    train_batch_size: PositiveInt = Field(
        2,
        description=(
            "pairs per forward/backward pass (gradient accumulation up to batch_size; activations take ~2 MB per "
            "token on the embedded model); must divide batch_size"
        ),
    )
    learning_rate: PositiveFloat = Field(
        1e-3, description="LoRA learning rate (2 steps at 2e-4 left every evaluation answer unchanged)"
    )
    max_length: PositiveInt = Field(256, description="tokens per example, prompt and response")
    lora_r: PositiveInt = Field(8, description="LoRA rank")
    lora_alpha: PositiveInt = Field(16, description="LoRA scaling numerator (scale = lora_alpha / lora_r)")
    seed: int = Field(0, description="trainer seed")
    checkpoint_every_steps: NonNegativeInt = Field(
        10,
        description=(
            "save a checkpoint every this many optimizer steps (0: none); a re-run of a killed step resumes from "
            "the last one with the same data order"
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "recompute activations in the backward pass: off, unlike TRL's default, since a 135M model does not "
            "need it (30% slower on 2 CPU cores); turn it on for 7B+"
        ),
    )

    @model_validator(mode="after")
    def _slices_fill_a_batch(self):
        if self.batch_size % self.train_batch_size:
            raise ValueError(f"train_batch_size ({self.train_batch_size}) must divide batch_size ({self.batch_size})")
        return self


@dataclass
class SFTResult:
    adapter_dir: Path
    log: list[dict] = field(default_factory=list)  # one row per optimizer step: step, loss, learning_rate, epoch
    epochs: list[dict] = field(default_factory=list)  # epoch, steps, train_loss, validation_loss (epoch 0: before)
    resumed_from_step: int = 0  # the checkpoint's step a re-run went on from (0: trained from the start)
    steps_taken: int = 0  # optimizer steps this call took
    world_size: int = 1  # processes that trained the adapter together


def sft_records(triples: Sequence[tuple[str, str, str]]) -> dict[str, list[str]]:
    return {"prompt": [sft_prompt(i, x) for i, x, _ in triples], "completion": [o.strip() for _, _, o in triples]}


def finetune(
    model,
    tokenizer,
    triples: Sequence[tuple[str, str, str]],
    settings: SFTSettings,
    output_dir: Path,
    device: str,
    on_log=None,
    validation: Sequence[tuple[str, str, str]] = (),
    checkpoints: Checkpoints | None = None,
) -> SFTResult:
    """A LoRA adapter fine-tuned on `triples`; with `checkpoints`, saved every N steps there and
    resumed from the last complete checkpoint found (the folder is removed once the adapter is saved)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not triples:
        raise ValueError("no (instruction, input, output) triples to fine-tune on")
    train = Dataset.from_dict(sft_records(triples))
    evaluated = {"train": train} | ({"validation": Dataset.from_dict(sft_records(validation))} if validation else {})
    counter = step_counter()
    resume = checkpoints.latest() if checkpoints is not None else None
    # Before any step: both losses of the untrained adapter (= the base model), the curves' origin;
    # a resumed run has them from the checkpoint's step state.
    start: dict[str, float] = checkpoints.read_state(step_of(resume)).get("start", {}) if resume else {}
    first_losses = _StartLosses(evaluated, start)
    callbacks = [log_forwarder(on_log), counter, first_losses]
    if checkpoints is not None:
        callbacks.append(step_state_saver(checkpoints, lambda: {"start": start}))
    trainer = with_epoch_seeded_sampler(SFTTrainer, settings.seed)(
        model=model,
        args=SFTConfig(
            **common_training_args(output_dir, settings.seed, device, checkpoints),
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.train_batch_size,
            gradient_accumulation_steps=accumulation_steps(
                settings.batch_size, settings.train_batch_size, "batch_size"
            ),
            per_device_eval_batch_size=8,
            learning_rate=settings.learning_rate,
            max_length=settings.max_length,
            eval_strategy="epoch" if validation else "no",
            gradient_checkpointing=settings.gradient_checkpointing,
            # Batches of similar lengths: padded positions cost as much as real ones.
            train_sampling_strategy="group_by_length",
        ),
        train_dataset=train,
        eval_dataset=evaluated.get("validation"),
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora_r, settings.lora_alpha),
        callbacks=callbacks,
    )
    first_losses.trainer = trainer
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    adapter_dir = save_adapter(trainer, tokenizer, output_dir)
    if checkpoints is not None and is_main_process():
        checkpoints.discard()
    steps = [
        {
            "step": int(h["step"]),
            "loss": float(h["loss"]),
            "learning_rate": float(h.get("learning_rate", 0.0)),
            "epoch": float(h.get("epoch", 0.0)),
        }
        for h in trainer.state.log_history
        if "loss" in h
    ]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    return SFTResult(
        adapter_dir,
        steps,
        epoch_log(steps, evals, start),
        step_of(resume) if resume is not None else 0,
        counter.taken,
        world_size(),
    )


def _start_losses_callback():
    from transformers import TrainerCallback

    class StartLosses(TrainerCallback):
        """Evaluates each dataset once training has begun, before its first step: inside train()
        the model is already wrapped for several processes (an evaluate() before train() would
        register it unwrapped, and each process would then train alone)."""

        def __init__(self, datasets: dict, start: dict):
            self.datasets, self.start, self.trainer = datasets, start, None

        def on_train_begin(self, args, state, control, **kw):
            if not self.start:
                for name, dataset in self.datasets.items():
                    self.start[name] = self.trainer.evaluate(dataset, metric_key_prefix=name)[f"{name}_loss"]

    return StartLosses


def _StartLosses(datasets: dict, start: dict):
    return _start_losses_callback()(datasets, start)


def epoch_log(steps: Sequence[dict], evals: Sequence[dict], start: dict[str, float]) -> list[dict]:
    """Per epoch: the optimizer steps so far, the epoch's step losses and their mean, and the
    validation loss after it; epoch 0 holds the losses measured before training (both evaluated
    on their whole slice, in eval mode)."""
    rows = [
        {
            "epoch": 0,
            "steps": 0,
            "step_losses": [],
            "train_loss": start.get("train", math.nan),
            "validation_loss": start.get("validation", math.nan),
        }
    ]
    last_epoch = max((s["epoch"] for s in steps), default=0.0)
    for k in range(1, math.ceil(last_epoch - 1e-9) + 1):
        in_epoch = [s for s in steps if k - 1 < s["epoch"] <= k + 1e-9]
        after = [e for e in evals if k - 1 < float(e.get("epoch", 0.0)) <= k + 1e-9]
        rows.append(
            {
                "epoch": k,
                "steps": max((s["step"] for s in in_epoch), default=rows[-1]["steps"]),
                "step_losses": [s["loss"] for s in in_epoch],
                "train_loss": sum(s["loss"] for s in in_epoch) / len(in_epoch) if in_epoch else math.nan,
                "validation_loss": float(after[-1]["eval_loss"]) if after else math.nan,
            }
        )
    return rows


def validation_never_improved(epochs: Sequence[dict]) -> bool:
    """True when no epoch's validation loss is below the one measured before training."""
    values = [e["validation_loss"] for e in epochs if not math.isnan(e["validation_loss"])]
    return len(values) >= 2 and min(values[1:]) >= values[0]
