"""Settings shared by the RL and SFT trainers (both TRL trainers on a LoRA adapter)."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import Checkpoints, trainer_save_args


def common_training_args(output_dir: Path, seed: int, device: str, checkpoints: Checkpoints | None = None) -> dict:
    """The adapter is saved once, at the end, into the artifact store; with `checkpoints` the
    trainer also saves every N steps into their folder (checkpoints.py), else nothing on the way."""
    args = dict(
        output_dir=str(output_dir / "trainer"),
        logging_steps=1,
        report_to=[],
        seed=seed,
        use_cpu=device == "cpu",
        bf16=False,  # the weights already come in the resource's dtype; no extra autocast
        disable_tqdm=True,
    )
    return args | trainer_save_args(checkpoints)


def lora_config(r: int, alpha: int):
    from peft import LoraConfig

    # all-linear: the same setting fits Llama, Mistral and the tiny test models without module names.
    return LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def log_forwarder(on_log):
    """A TrainerCallback passing each log dict to on_log(step, max_steps, logs)."""
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if on_log is not None and logs:
                on_log(state.global_step, state.max_steps, logs)

    return _Forward()


def save_adapter(trainer, tokenizer, output_dir: Path) -> Path:
    """The adapter and tokenizer into output_dir/adapter, written by the main process only."""
    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # the Trainer writes on the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
    return adapter_dir
