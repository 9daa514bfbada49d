"""Counting model queries by role (generator, judge, rewriter, reviewer, expert, evaluated, audit), for
the query ledger: one query is one prompt generated from or one text scored."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager

from .backend import ServedModel

ROLES = ("generator", "judge", "rewriter", "reviewer", "expert", "evaluated", "audit")


class QueryCounter:
    def __init__(self):
        self.counts: Counter[str] = Counter()

    def add(self, role: str, n: int) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown query role {role!r}; the roles are {', '.join(ROLES)}")
        self.counts[role] += int(n)

    def wrap(self, model: ServedModel, role: str, scoring_role: str | None = None) -> CountedModel:
        """`model` counted under `role`; its scoring calls under `scoring_role` when given (a
        model that both writes and judges, as the base model in the bootstrap does)."""
        for r in {role, scoring_role or role}:
            self.add(r, 0)  # a role that was opened shows in the ledger even if it made no query
        return CountedModel(model, role, self, scoring_role)

    def as_json(self) -> str:
        return json.dumps({role: self.counts[role] for role in ROLES if role in self.counts})


class CountedModel(ServedModel):
    """`model`, with every prompt and scored text counted under `role`."""

    def __init__(self, model: ServedModel, role: str, counter: QueryCounter, scoring_role: str | None = None):
        self.inner, self.role, self.counter, self.scoring_role = model, role, counter, scoring_role or role
        self.tokenizer, self.provenance, self.capabilities = model.tokenizer, model.provenance, model.capabilities

    def generate(self, prompts, params, batch_size=8, seed=None, progress=None, stop_after_first_line=False):
        self.counter.add(self.role, len(prompts))
        return self.inner.generate(prompts, params, batch_size, seed, progress, stop_after_first_line)

    def continuation_logprobs(self, contexts, continuations, batch_size=8):
        self.counter.add(self.scoring_role, len(contexts))
        return self.inner.continuation_logprobs(contexts, continuations, batch_size)

    def next_token_distribution(self, contexts, candidate_tokens, batch_size=8):
        self.counter.add(self.scoring_role, len(contexts))
        return self.inner.next_token_distribution(contexts, candidate_tokens, batch_size)

    def generate_and_score(
        self,
        prompts,
        continuations,
        params,
        batch_size=8,
        seed=None,
        progress=None,
        stop_after_first_line=False,
        score_batch_size=16,
    ):
        # One query per prompt: its answer and its references are read on one prefill.
        self.counter.add(self.role, len(prompts))
        return self.inner.generate_and_score(
            prompts, continuations, params, batch_size, seed, progress, stop_after_first_line, score_batch_size
        )

    @contextmanager
    def for_generation(self):
        with self.inner.for_generation() as view:
            yield CountedModel(view, self.role, self.counter, self.scoring_role)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name):
        # Backend-specific attributes (the transformers model, the adapter) stay reachable.
        return getattr(self.inner, name)
