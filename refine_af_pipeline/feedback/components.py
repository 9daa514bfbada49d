"""Feedback components: one scorer per property of an (instruction, input, output) instance.

A component has a `name` (the property it scores: preference, naturalness, coherence or
understandability), a `version` (the method and the model it uses, recorded with every score) and
`score(instructions, inputs, outputs) -> list[float]`, one number per instance, higher = better.
This module holds the offline defaults, which need nothing beyond the base model and the PyPI
packages; judges.py holds the paper's judges (a reward model, UniEval-style evaluators).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from ..llm.backend import ServedModel, render_prompt
from ..llm.prompts import judge_prompt


class FeedbackComponent(Protocol):
    name: str
    version: str

    def score(self, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> list[float]: ...


def request_text(instruction: str, input_text: str, sep: str = "\n") -> str:
    """What the output answers: the instruction, then its input when there is one."""
    return f"{instruction}{sep}{input_text}".strip()


class LLMJudgePreference:
    """The base LLM rates the response 1..10; the score is the probability-weighted mean rating over
    the single-token ratings (not a parsed number, which a small model garbles), mapped to [0, 1]."""

    name = "preference"
    method = "llm-judge-rating-1-10/v1"

    def __init__(self, judge: ServedModel, batch_size: int = 8):
        judge.require("next_token_distribution", "the preference scorer llm-judge (the 1-10 rating)")
        self.judge, self.tokenizer, self.batch_size = judge, judge.tokenizer, batch_size
        self.version = self.version_for(judge.provenance.served_model)
        self.ratings = [
            r for r in map(str, range(1, 11)) if len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) == 1
        ]
        if len(self.ratings) < 2:
            raise ValueError("the judge's tokenizer has fewer than two single-token ratings among 1..10")

    @classmethod
    def version_for(cls, model_id: str) -> str:
        return f"{cls.method}:{model_id}"

    def score(self, instructions, inputs, outputs) -> list[float]:
        contexts = [
            render_prompt(self.tokenizer, judge_prompt(i, x, o)) for i, x, o in zip(instructions, inputs, outputs)
        ]
        dists = self.judge.next_token_distribution(contexts, self.ratings, self.batch_size)
        values = [int(r) for r in self.ratings]
        lo, hi = min(values), max(values)
        return [(sum(p * v for p, v in zip(d, values)) - lo) / (hi - lo) for d in dists]


class LikelihoodNaturalness:
    """exp(mean token log-likelihood) of the output given the request under the base model: the
    per-token probability, length-normalised so that long outputs are not punished for length."""

    name = "naturalness"
    method = "mean-token-likelihood/v1"

    def __init__(self, judge: ServedModel, batch_size: int = 8):
        judge.require("continuation_logprobs", "the naturalness scorer likelihood")
        self.judge, self.tokenizer, self.batch_size = judge, judge.tokenizer, batch_size
        self.version = self.version_for(judge.provenance.served_model)

    @classmethod
    def version_for(cls, model_id: str) -> str:
        return f"{cls.method}:{model_id}"

    def score(self, instructions, inputs, outputs) -> list[float]:
        requests = [render_prompt(self.tokenizer, request_text(i, x)) for i, x in zip(instructions, inputs)]
        logprobs = self.judge.continuation_logprobs(requests, list(outputs), self.batch_size)
        return [math.exp(sum(lp) / len(lp)) if lp else 0.0 for lp in logprobs]


class EmbeddingCoherence:
    """Cosine similarity of the sentence embeddings of (instruction + input) and output: an output
    about something else than its task scores low."""

    name = "coherence"
    method = "embedding-cosine/v1"

    def __init__(self, embedder, model_id: str):
        self.embedder = embedder
        self.version = self.version_for(model_id)

    @classmethod
    def version_for(cls, model_id: str) -> str:
        return f"{cls.method}:{model_id}"

    def score(self, instructions, inputs, outputs) -> list[float]:
        requests = self.embedder.encode(
            [request_text(i, x, " ") for i, x in zip(instructions, inputs)], normalize_embeddings=True
        )
        answers = self.embedder.encode(list(outputs), normalize_embeddings=True)
        return [float((a * b).sum()) for a, b in zip(requests, answers)]


def flesch_score(text: str) -> float:
    """Flesch reading ease clipped to [0, 100] (beyond it the formula only counts syllables) / 100."""
    import textstat

    return min(max(textstat.flesch_reading_ease(text), 0.0), 100.0) / 100.0


class ReadabilityUnderstandability:
    """Flesch reading ease of the output (textstat): short sentences of short words read easily."""

    name = "understandability"
    method = "flesch-reading-ease/v1"

    def __init__(self):
        self.version = self.version_for()

    @classmethod
    def version_for(cls, model_id: str = "") -> str:
        from importlib.metadata import version

        # textstat's syllable counting changed between releases; the version pins the numbers.
        return f"{cls.method}:textstat-{version('textstat')}"

    def score(self, instructions, inputs, outputs) -> list[float]:
        return [flesch_score(o) for o in outputs]
