"""One process of a distributed training, as torchrun starts it:

    torchrun --nproc_per_node N -m refine_af_pipeline.training.torchrun_worker SPEC.json

SPEC (written by resources/training_launcher.py) says what to train: SFT on triples, or RL on
instructions with the feedback scorer; the model, the settings, the output and checkpoint folders.
Every process loads the model, takes its share of each step (the Trainer's DistributedSampler and
DDP over gloo on CPU, NCCL on CUDA) and ends with the same adapter; the main process writes the
adapter, the checkpoints and the result file, and its log lines go to Dagster through Pipes. Each
process also writes rank-<r>.json beside the result: the digest of its adapter weights and its
step count, so a test can see that all ranks ended equal.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .checkpoints import Checkpoints
from .distributed import gathered, is_main_process, local_rank, rank, world_size


def adapter_digest(model) -> str:
    """sha256 over the LoRA weights as this process holds them."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            digest.update(name.encode() + parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _device(spec: dict) -> str:
    if spec["device"].startswith("cuda"):
        import torch

        torch.cuda.set_device(local_rank())
        return f"cuda:{local_rank()}"
    return "cpu"


def _load(spec: dict, device: str):
    from ..llm.models import ModelSource, load_causal_lm, load_tokenizer, resolve_dtype

    source = ModelSource(**spec["model"])
    trust = spec.get("trust_remote_code", False)
    model = load_causal_lm(source, device, resolve_dtype(spec.get("dtype", "auto"), device), trust)
    return model, load_tokenizer(source, trust), source


def _checkpoints(spec: dict) -> Checkpoints | None:
    saved = spec.get("checkpoints")
    return Checkpoints(Path(saved["folder"]), saved["every_steps"]) if saved else None


def run_sft(spec: dict, device: str, say) -> tuple[dict, object]:
    from .sft import SFTSettings, finetune

    model, tokenizer, _ = _load(spec, device)

    def on_log(step, total, logs):
        if "loss" in logs:
            say(f"SFT step {step}/{total}: loss {logs['loss']:.3f} ({world_size()} processes)")

    result = finetune(
        model,
        tokenizer,
        [tuple(t) for t in spec["train"]],
        SFTSettings(**spec["settings"]),
        Path(spec["output_dir"]),
        device,
        on_log,
        [tuple(t) for t in spec.get("validation", [])],
        _checkpoints(spec),
    )
    summary = {"log": result.log, "epochs": result.epochs}
    return summary | _common(result), model


def run_rl(spec: dict, device: str, say) -> tuple[dict, object]:
    import math

    from resources.feedback_scorer import FeedbackScorerResource

    from ..feedback.scores import ComponentStats
    from ..llm.adapters import AdapterView
    from ..llm.query_count import QueryCounter
    from ..llm.transformers_backend import TransformersModel
    from .rl import RLSettings, train_policy

    model, tokenizer, source = _load(spec, device)
    view = AdapterView()  # the judge: this process's policy weights with the adapter off
    queries = QueryCounter()
    judge = queries.wrap(
        TransformersModel(view, tokenizer, source.model_id, max_batch_tokens=spec["max_batch_tokens"]), "judge"
    )
    scorer = FeedbackScorerResource(**spec["feedback_scorer"]).build(
        judge,
        device,
        ComponentStats(**spec["stats"]) if spec.get("stats") else None,
        spec["scoring_batch_size"],
        spec.get("learned_reward_dir"),
    )

    def on_log(step, total, logs):
        if "reward" in logs:
            say(
                f"RL step {step}/{total}: reward {logs['reward']:.3f}, kl {logs.get('kl', math.nan):.4f} "
                f"({world_size()} processes)"
            )

    result = train_policy(
        model,
        tokenizer,
        spec["instructions"],
        scorer,
        RLSettings(**spec["settings"]),
        Path(spec["output_dir"]),
        device,
        on_log,
        base_view=view,
        is_classification=spec["is_classification"],
        checkpoints=_checkpoints(spec),
    )
    # Every process judged its share of the completions: the step's queries are the sum.
    judged = sum(gathered([queries.counts.get("judge", 0)]))
    return {"log": result.log, "judge_queries": judged} | _common(result), model


def _common(result) -> dict:
    return {
        "adapter_dir": str(result.adapter_dir),
        "resumed_from_step": result.resumed_from_step,
        "steps_taken": result.steps_taken,
        "world_size": world_size(),
    }


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    pipes = _open_pipes()
    say = pipes.log.info if pipes is not None else (lambda text: print(text, flush=True))
    try:
        device = _device(spec)
        summary, model = {"sft": run_sft, "rl": run_rl}[spec["kind"]](spec, device, say)
        mine = {"rank": rank(), "adapter_digest": adapter_digest(model), "steps_taken": summary["steps_taken"]}
        (result_path.parent / f"rank-{rank()}.json").write_text(json.dumps(mine))
        if is_main_process():
            tmp = result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(summary))
            tmp.replace(result_path)
    finally:
        if pipes is not None:
            pipes.close()


def _open_pipes():
    """Dagster Pipes on the main process when a step launched this one (its log lines reach the UI)."""
    import os

    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    launched_by_a_step = bool(os.environ.get(DAGSTER_PIPES_CONTEXT_ENV_VAR))
    return open_dagster_pipes() if is_main_process() and launched_by_a_step else None


if __name__ == "__main__":
    main(sys.argv[1])
