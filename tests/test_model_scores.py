"""One model's evaluation scores and rows (refine_af_pipeline/evaluation/model_scores.py), on a fake view."""

import json

import pytest

from refine_af_pipeline.evaluation.model_scores import (
    means_over_replicates,
    prediction_rows,
    score_model,
    task_rows,
)
from refine_af_pipeline.evaluation.tasks import EvalInstance, EvalTask
from refine_af_pipeline.llm.backend import Generation, SamplingParams

pytestmark = pytest.mark.unit

A = EvalTask(
    "task_a", "Say the colour.", (EvalInstance("a1", "sky", ("blue",)), EvalInstance("a2", "grass", ("green",)))
)
B = EvalTask("task_b", "Add.", (EvalInstance("b1", "2+2", ("4", "four")),))
ITEMS = [(A, A.instances[0]), (A, A.instances[1]), (B, B.instances[0])]


class FakeView:
    def __init__(self, texts, logprobs):
        self.texts, self.logprobs, self.calls = texts, logprobs, []

    def generate_and_score(self, prompts, continuations, params, batch_size, seed, progress, **kwargs):
        self.calls.append((prompts, continuations, batch_size, kwargs))
        return [Generation(t, 3, False) for t in self.texts], self.logprobs


def test_the_first_line_is_scored_against_the_best_reference_and_the_best_reference_likelihood_counts():
    view = FakeView(["blue\nmore text", "red", "four"], [[[-1.0, -1.0]], [[-2.0]], [[-3.0], [-0.5, -1.5]]])
    scores = score_model(view, ITEMS, SamplingParams(max_new_tokens=4, do_sample=False), 7, 5, None)
    assert scores.answers == ["blue", "red", "four"]
    assert scores.rouge_l == [1.0, 0.0, 1.0]
    assert scores.log_likelihood == [-1.0, -2.0, -1.0]  # per item: the best reference's mean
    assert scores.rouge_l_by_task == {"task_a": 0.5, "task_b": 1.0}
    assert scores.log_likelihood_by_task == {"task_a": -1.5, "task_b": -1.0}
    [(prompts, continuations, batch_size, kwargs)] = view.calls
    assert len(prompts) == 3 and "sky" in prompts[0] and batch_size == 7
    assert kwargs == {"stop_after_first_line": True, "score_batch_size": 5}
    assert len(continuations[2]) == 2  # every reference of the item is read

    provenance = {"model_id": "m", "backend": "transformers", "engine_version": "x"}
    tasks = task_rows(ITEMS, scores, "refine_af", 1, provenance, "/a/adapter", "run-1")
    assert [r["task"] for r in tasks] == ["task_a", "task_b"]
    assert list(tasks[0]) == [
        "task", "model", "replicate", "model_id", "backend", "engine_version", "adapter_path",
        "rouge_l", "log_likelihood", "n_instances", "run_id",
    ]  # fmt: skip
    assert tasks[0]["n_instances"] == 2 and tasks[1]["log_likelihood"] == -1.0
    predictions = prediction_rows(ITEMS, scores, "refine_af", 1, provenance, "run-1")
    assert [p["instance_id"] for p in predictions] == ["a1", "a2", "b1"]
    assert json.loads(predictions[2]["references"]) == ["4", "four"] and predictions[1]["prediction"] == "red"


def test_task_means_are_averaged_over_replicates():
    by_replicate = {"rouge_l": {"base": [{"t": 0.2}, {"t": 0.4}], "refine_af": [{"t": 1.0}]}}
    assert means_over_replicates(by_replicate) == {
        "rouge_l": {"base": {"t": pytest.approx(0.3)}, "refine_af": {"t": 1.0}}
    }
