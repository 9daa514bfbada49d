"""Held-out evaluation on tasks in the Super-NaturalInstructions task-file format."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import ConfigDict, Field

from ..instructions.rouge import rouge_l
from ..llm.backend import ServedModel, mean_logprob
from ..settings_types import GenerationBatchSettings, NonNegativeInt, PositiveInt
from ..text_files import decode_utf8


class TaskFileError(ValueError):
    """An evaluation task file that cannot be used; the message names the file and where."""


@dataclass(frozen=True)
class EvalInstance:
    id: str
    input: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class EvalTask:
    name: str
    definition: str
    instances: tuple[EvalInstance, ...]


def builtin_task_dir() -> Path:
    return Path(str(resources.files("refine_af_pipeline") / "data" / "eval_tasks"))


def load_task_file(path: Path) -> EvalTask:
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found")
    text = decode_utf8(path, path.read_bytes(), TaskFileError)
    if not text.strip():
        raise TaskFileError(f"{path}: task file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskFileError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise TaskFileError(f"{path}: expected a JSON object with Definition and Instances")
    definition = obj.get("Definition")
    if isinstance(definition, list) and definition and all(isinstance(d, str) for d in definition):
        definition = " ".join(definition)
    if not isinstance(definition, str) or not definition.strip():
        raise TaskFileError(f"{path}: 'Definition' must be a non-empty string or list of strings")
    raw = obj.get("Instances")
    if not isinstance(raw, list) or not raw:
        raise TaskFileError(f"{path}: 'Instances' must be a non-empty list")
    instances = []
    for k, inst in enumerate(raw):
        where = f"{path}: Instances[{k}]"
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            raise TaskFileError(f"{where}: needs a string 'input'")
        refs = inst.get("output")
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise TaskFileError(f"{where}: 'output' must be a non-empty list of reference strings")
        instances.append(EvalInstance(str(inst.get("id", f"{path.stem}-{k}")), inst["input"], tuple(refs)))
    return EvalTask(path.stem, definition.strip(), tuple(instances))


def load_tasks(directory: str | Path | None = None) -> list[EvalTask]:
    folder = builtin_task_dir() if directory is None else Path(directory)
    if not folder.is_dir():
        raise TaskFileError(f"{folder}: evaluation task directory not found")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise TaskFileError(f"{folder}: no *.json task files")
    return [load_task_file(f) for f in files]


def best_rouge_l(prediction: str, references: tuple[str, ...]) -> float:
    """Max ROUGE-L F over references, as SuperNI scores multiple reference outputs."""
    return max(rouge_l(ref, prediction) for ref in references)


def first_line(text: str) -> str:
    # Short-answer tasks: the answer is the first non-empty line; anything after is rambling.
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def evaluation_items(tasks: list[EvalTask], instances_per_task: int = 0) -> list[tuple[EvalTask, EvalInstance]]:
    """(task, instance) pairs to score: the first `instances_per_task` of each task (0 = all)."""
    return [
        (t, inst)
        for t in tasks
        for inst in (t.instances[:instances_per_task] if instances_per_task > 0 else t.instances)
    ]


def mean_by_task(items: list[tuple[EvalTask, EvalInstance]], scores: list[float]) -> dict[str, float]:
    """Task name -> mean of its instances' scores (SuperNI averages within a task first)."""
    by_task: dict[str, list[float]] = {}
    for (task, _), score in zip(items, scores, strict=True):
        by_task.setdefault(task.name, []).append(score)
    return {name: sum(values) / len(values) for name, values in by_task.items()}


def reference_continuations(references: Sequence[str]) -> list[str]:
    # The answer follows "Output:" after a space, as the model writes it.
    return [" " + ref.strip() for ref in references]


def best_mean_logprob(logprobs_per_reference: Sequence[Sequence[float]]) -> float:
    """The best reference's mean per-token log-likelihood (NaN if none has a scored token)."""
    values = [v for v in map(mean_logprob, logprobs_per_reference) if not math.isnan(v)]
    return max(values) if values else math.nan


def reference_log_likelihood(
    model: ServedModel, prompts: Sequence[str], references: Sequence[Sequence[str]], batch_size: int = 8
) -> list[float]:
    """Per prompt, the mean per-token log-likelihood (nats) of its reference outputs after the
    prompt, teacher-forced; the best reference counts, as for ROUGE-L. Unlike the greedy answer,
    this moves with any change of the model's distribution over the right answer. (The
    evaluation asset gets the same numbers from prefix_scoring, sharing the prompt's prefill.)"""
    contexts, continuations, owner = [], [], []
    for k, (prompt, refs) in enumerate(zip(prompts, references, strict=True)):
        for cont in reference_continuations(refs):
            contexts.append(prompt)
            continuations.append(cont)
            owner.append(k)
    per_prompt: list[list[list[float]]] = [[] for _ in prompts]
    for k, logprobs in zip(owner, model.continuation_logprobs(contexts, continuations, batch_size)):
        per_prompt[k].append(logprobs)
    return [best_mean_logprob(lists) for lists in per_prompt]


class EvaluationSettings(GenerationBatchSettings):
    """Settings of `evaluation`: which tasks, how many instances, how the answers are read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_dir: str | None = Field(None, description="a folder of SuperNI-format task files; the built-in set if unset")
    instances_per_task: NonNegativeInt = Field(
        0, description=("instances evaluated per task (0 = all, the method; SuperNI's test set has up to 100 per task)")
    )
    max_new_tokens: PositiveInt = Field(
        16,
        description=(
            "tokens per greedy answer (ROUGE-L reads its first line; that of 90% of the embedded model's answers fits)"
        ),
    )
    bootstrap_resamples: PositiveInt = Field(10_000, description="resamples of the tasks behind the CIs")
    seed: int = Field(0, description="seed of the bootstrap")
