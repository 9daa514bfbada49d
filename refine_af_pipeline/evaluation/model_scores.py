"""One model's answers to the evaluation items and what they score: the first line of a greedy answer
by ROUGE-L against the best reference, and the best reference's mean per-token log-likelihood after
the same prompt (read on the answer's prefill)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..llm.backend import SamplingParams
from ..llm.prompts import evaluation_prompt
from .tasks import (
    EvalInstance,
    EvalTask,
    best_mean_logprob,
    best_rouge_l,
    first_line,
    mean_by_task,
    reference_continuations,
)

Items = list[tuple[EvalTask, EvalInstance]]


@dataclass(frozen=True)
class ModelScores:
    answers: list[str]
    rouge_l: list[float]  # per item
    log_likelihood: list[float]  # per item
    rouge_l_by_task: dict[str, float]
    log_likelihood_by_task: dict[str, float]


def score_model(
    view, items: Items, params: SamplingParams, batch_size: int, score_batch_size: int, progress: Callable | None
) -> ModelScores:
    """`view`: the model opened for generation (a backend's generation view). Only the first line
    is scored, so a row may stop there: the same answers in fewer tokens."""
    prompts = [evaluation_prompt(t.definition, inst.input) for t, inst in items]
    gens, reference_logprobs = view.generate_and_score(
        prompts,
        [reference_continuations(inst.references) for _, inst in items],
        params,
        batch_size,
        0,
        progress,
        stop_after_first_line=True,
        score_batch_size=score_batch_size,
    )
    answers = [first_line(g.text) for g in gens]
    scores = [best_rouge_l(a, inst.references) for a, (_, inst) in zip(answers, items)]
    likelihoods = [best_mean_logprob(lists) for lists in reference_logprobs]
    return ModelScores(answers, scores, likelihoods, mean_by_task(items, scores), mean_by_task(items, likelihoods))


def task_rows(
    items: Items, scores: ModelScores, model: str, replicate: int, provenance: dict, adapter_path, run_id: str
) -> list[dict]:
    """One row per task: the model's task means, with the model as served (`provenance`)."""
    counts = Counter(t.name for t, _ in items)
    return [
        dict(
            task=name,
            model=model,
            replicate=replicate,
            **provenance,
            adapter_path=adapter_path,
            rouge_l=score,
            log_likelihood=scores.log_likelihood_by_task[name],
            n_instances=counts[name],
            run_id=run_id,
        )
        for name, score in scores.rouge_l_by_task.items()
    ]


def prediction_rows(
    items: Items, scores: ModelScores, model: str, replicate: int, provenance: dict, run_id: str
) -> list[dict]:
    """One row per evaluation instance: the answer, its scores and the references."""
    return [
        dict(
            task=t.name,
            instance_id=inst.id,
            model=model,
            replicate=replicate,
            prediction=a,
            rouge_l=s,
            reference_log_likelihood=ll,
            references=json.dumps(list(inst.references)),
            **provenance,
            run_id=run_id,
        )
        for (t, inst), a, s, ll in zip(items, scores.answers, scores.rouge_l, scores.log_likelihood)
    ]


def means_over_replicates(
    by_replicate: dict[str, dict[str, list[dict[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """metric -> model -> task -> the task's mean over the model's replicates."""
    return {
        metric: {
            label: {task: sum(r[task] for r in reps) / len(reps) for task in reps[0]}
            for label, reps in by_label.items()
        }
        for metric, by_label in by_replicate.items()
    }
