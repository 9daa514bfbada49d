"""Supervised fine-tuning on (instruction, input, output) triples: TRL SFTTrainer with LoRA.

Prompt/completion records (Alpaca-style prompt, output as completion) so the loss covers only the
response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import sft_prompt


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
    eos_free = [(sft_prompt(i, x), o.strip()) for i, x, o in triples]
    return {"prompt": [p for p, _ in eos_free], "completion": [c for _, c in eos_free]}


def finetune(model, tokenizer, triples: Sequence[tuple[str, str, str]], settings: SFTSettings, output_dir: Path,
             device: str, on_log=None) -> SFTResult:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if not triples:
        raise ValueError("no (instruction, input, output) triples to fine-tune on")

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if on_log is not None and logs:
                on_log(state.global_step, state.max_steps, logs)

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(output_dir / "trainer"),
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            max_length=settings.max_length,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=settings.seed,
            use_cpu=device == "cpu",
            bf16=False,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_dict(sft_records(triples)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[_Forward()],
    )
    trainer.train()
    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    log = [
        {"step": int(h["step"]), "loss": float(h["loss"]), "learning_rate": float(h.get("learning_rate", 0.0)),
         "epoch": float(h.get("epoch", 0.0))}
        for h in trainer.state.log_history if "loss" in h
    ]
    return SFTResult(adapter_dir, log)
