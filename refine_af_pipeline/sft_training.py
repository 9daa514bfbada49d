"""Supervised fine-tuning on (instruction, input, output) triples: TRL SFTTrainer with LoRA.

Prompt/completion records (Alpaca-style prompt, output as completion) so the loss covers only the
response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import sft_prompt
from .trainer_setup import common_training_args, log_forwarder, lora_config, save_adapter


@dataclass
class SFTSettings:
    epochs: float = 2.0
    batch_size: int = 8
    learning_rate: float = 2e-4
    max_length: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0


@dataclass
class SFTResult:
    adapter_dir: Path
    log: list[dict] = field(default_factory=list)


def sft_records(triples: Sequence[tuple[str, str, str]]) -> dict[str, list[str]]:
    return {"prompt": [sft_prompt(i, x) for i, x, _ in triples], "completion": [o.strip() for _, _, o in triples]}


def finetune(model, tokenizer, triples: Sequence[tuple[str, str, str]], settings: SFTSettings, output_dir: Path,
             device: str, on_log=None) -> SFTResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if not triples:
        raise ValueError("no (instruction, input, output) triples to fine-tune on")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **common_training_args(output_dir, settings.seed, device),
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            max_length=settings.max_length,
        ),
        train_dataset=Dataset.from_dict(sft_records(triples)),
        processing_class=tokenizer,
        peft_config=lora_config(settings.lora_r, settings.lora_alpha),
        callbacks=[log_forwarder(on_log)],
    )
    trainer.train()
    adapter_dir = save_adapter(trainer, tokenizer, output_dir)
    log = [
        {"step": int(h["step"]), "loss": float(h["loss"]), "learning_rate": float(h.get("learning_rate", 0.0)),
         "epoch": float(h.get("epoch", 0.0))}
        for h in trainer.state.log_history if "loss" in h
    ]
    return SFTResult(adapter_dir, log)
