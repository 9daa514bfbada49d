"""The reward of one rewrite: did it add something to the instruction it rewrote?

The paper's reviewer (a large chat model) answers "Equal" / "Not Equal" in words (Evol-Instruct's
"no information gain" elimination). A 135M model does not write those words reliably, so the
judgement is read from its next-token distribution after a Yes/No question (the same scoring call
as the UniEval-style feedback judges): reward = P(Yes) / (P(Yes) + P(No)). Cheap code rules catch
what needs no model and score 0: empty or punctuation-only text, a refusal, a copy, a near copy
by ROUGE-L, an echo of the rewrite request, leaked prompt words."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..instructions.rouge import rouge_l
from ..llm.backend import ServedModel, render_prompt
from .call_cache import CallCache
from .operations import EXAMPLE_REWRITES, EXAMPLE_WORDS, LEAK_MARKERS, OPERATIONS

REVIEW_QUESTION = (
    "Task A: {before}\n\nTask B: {after}\n\n"
    "Compared with Task A, does Task B add something new, such as an extra requirement, a constraint, more depth, "
    "more detail or a different subject? Answer Yes or No."
)
REFUSALS = ("i'm sorry", "i am sorry", "i cannot", "i can't", "as an ai", "i'm unable", "i am unable")
NEAR_COPY_ROUGE_L = 0.9
# A small model often hands back the request's worked example instead of rewriting the task.
EXAMPLE_COPY_ROUGE_L = 0.7


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!?")


# The first five words of each rewrite request: a reply that contains one echoed the request.
_REQUEST_OPENINGS = tuple(" ".join(how.lower().split()[:5]) for how in OPERATIONS.values())


def rule_zero(before: str, after: str, near_copy: float = NEAR_COPY_ROUGE_L) -> str | None:
    """Why a rewrite scores 0 without asking the model, or None."""
    if not re.search(r"[A-Za-z0-9]", after):
        return "empty_or_punctuation"
    low = _normal(after)
    if any(low.startswith(r) for r in REFUSALS):
        return "refusal"
    if low == _normal(before):
        return "identical"
    if any(opening in low for opening in _REQUEST_OPENINGS):
        return "echo_of_request"
    if any(marker in low for marker in LEAK_MARKERS):
        return "leaked_prompt_words"
    if any(w in low and w not in before.lower() for w in EXAMPLE_WORDS) or any(
        rouge_l(example, after) >= EXAMPLE_COPY_ROUGE_L for example in EXAMPLE_REWRITES.values()
    ):
        return "copied_example"
    if rouge_l(before, after) >= near_copy:
        return "near_identical"
    return None


@dataclass(frozen=True)
class Review:
    reward: float  # P(differs) from the model, 0 where a rule fired
    p_differs: float | None  # None where a rule fired (the model was not asked)
    rule: str | None
    cached: bool


class InformationGainReviewer:
    """Scores (before, after) pairs; `version` names the model, question and rules, as the
    feedback scorers' versions do."""

    def __init__(
        self,
        model: ServedModel,
        batch_size: int = 16,
        near_copy: float = NEAR_COPY_ROUGE_L,
        cache: CallCache | None = None,
    ):
        model.require("next_token_distribution", "the TeaMs-RL reviewer (P(Yes) after its question)")
        self.model, self.batch_size, self.near_copy, self.cache = model, batch_size, near_copy, cache
        digest = hashlib.sha256(
            json.dumps(
                [
                    REVIEW_QUESTION,
                    REFUSALS,
                    LEAK_MARKERS,
                    EXAMPLE_REWRITES,
                    EXAMPLE_WORDS,
                    EXAMPLE_COPY_ROUGE_L,
                    near_copy,
                ]
            ).encode()
        ).hexdigest()[:8]
        self.version = f"teams-information-gain/v1:{model.provenance.served_model}:q-{digest}"
        self.model_calls = 0  # judgements the model made (cache hits and rule zeros excluded)

    def review(self, befores: Sequence[str], afters: Sequence[str]) -> list[Review]:
        rules = [rule_zero(b, a, self.near_copy) for b, a in zip(befores, afters, strict=True)]
        ask = [k for k, r in enumerate(rules) if r is None]
        contexts = [
            render_prompt(
                self.model.tokenizer, REVIEW_QUESTION.format(before=befores[k].strip(), after=afters[k].strip())
            )
            for k in ask
        ]
        keys = [self._key(c) for c in contexts]
        known = self.cache.get_many(keys) if self.cache else {}
        missing = [j for j, key in enumerate(keys) if key not in known]
        if missing:
            probs = self.model.next_token_distribution([contexts[j] for j in missing], ["Yes", "No"], self.batch_size)
            self.model_calls += len(missing)
            fresh = {keys[j]: p[0] for j, p in zip(missing, probs)}
            if self.cache:
                self.cache.put_many(fresh)
            known = {**known, **fresh}
        asked = set(missing)
        p_by_k = {k: (float(known[keys[j]]), j not in asked) for j, k in enumerate(ask)}
        out = []
        for k, rule in enumerate(rules):
            if rule is not None:
                out.append(Review(0.0, None, rule, False))
            else:
                p, cached = p_by_k[k]
                out.append(Review(p, p, None, cached))
        return out

    def _key(self, context: str) -> str:
        return CallCache.key("review", self.model.provenance.columns(), context)
