"""What the stages ask of a language model, whichever engine serves it.

A `ServedModel` is one model (the base model, or the base model with one LoRA adapter) as one
backend serves it. The stages need three things of it:

- `generate`: continuations of rendered prompts (text, token count, whether the limit was hit);
- `continuation_logprobs`: the log-probability of each token of given continuations after given
  contexts (the naturalness judge, the evaluation's reference log-likelihood);
- `next_token_distribution`: the probabilities of a few single-token candidates as the next token,
  renormalised over them (the Yes/No judges, the 1-10 rating judge).

A backend says which of these it can do (`capabilities`); a component that needs one the backend
lacks calls `require` when it is built, so the step fails at its start with both names.

Prompts are rendered here, with the model's own tokenizer (every backend has one locally), so
every backend sees the same text. Implementations: transformers_backend (in-process Hugging Face,
the CPU default), vllm_backend (vLLM's offline engine), openai_backend (any OpenAI-compatible
server).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from ..settings_types import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

Capability = Literal["generate", "continuation_logprobs", "next_token_distribution"]
ALL_CAPABILITIES: frozenset[str] = frozenset(get_args(Capability))
BackendName = Literal["transformers", "vllm", "openai"]

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    do_sample: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int
    hit_token_limit: bool


@dataclass(frozen=True)
class Provenance:
    """Recorded with every generated row: which engine produced it, its version, and the name the
    model was served as (a hub id or folder in process, the served model name on a server)."""

    backend: str
    engine_version: str
    served_model: str

    def columns(self) -> dict[str, str]:
        return {"backend": self.backend, "engine_version": self.engine_version, "served_model": self.served_model}


class CapabilityMissing(RuntimeError):
    """A component needs something the chosen backend cannot compute."""


class ServedModel:
    """Base of the backends' models; see the module docstring. Subclasses set `tokenizer`,
    `provenance` and `capabilities` and implement what they support."""

    tokenizer = None
    provenance: Provenance
    capabilities: frozenset[str] = frozenset({"generate"})

    def require(self, capability: Capability, needed_by: str) -> None:
        if capability not in self.capabilities:
            have = ", ".join(sorted(self.capabilities)) or "nothing"
            raise CapabilityMissing(
                f"{needed_by} needs {capability}, which the {self.provenance.backend} backend serving "
                f"{self.provenance.served_model} does not provide (it provides {have}); choose another scorer or "
                "a backend that returns log-probabilities"
            )

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        batch_size: int = 8,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        stop_after_first_line: bool = False,
    ) -> list[Generation]:
        """One continuation per rendered prompt, in prompt order. `seed` makes sampling repeatable
        (per engine: the same seed on two engines draws different tokens). `stop_after_first_line`
        is a hint for callers that keep only the first non-empty line: an engine may stop a row
        there, and that line is the same either way."""
        raise NotImplementedError

    def continuation_logprobs(
        self, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
    ) -> list[list[float]]:
        """Per pair, the log-probability of each continuation token after its context (the two
        tokenized apart, then joined). A continuation token with no context before it has no
        prediction and is left out."""
        self.require("continuation_logprobs", "continuation_logprobs")
        raise NotImplementedError

    def next_token_distribution(
        self, contexts: Sequence[str], candidate_tokens: Sequence[str], batch_size: int = 8
    ) -> list[list[float]]:
        """Per context, the probability of each candidate (its first token) as the next token,
        renormalised over the candidates."""
        self.require("next_token_distribution", "next_token_distribution")
        raise NotImplementedError

    def generate_and_score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[Sequence[str]],
        params: SamplingParams,
        batch_size: int = 8,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        stop_after_first_line: bool = False,
        score_batch_size: int = 16,
    ) -> tuple[list[Generation], list[list[list[float]]]]:
        """(a generation per prompt, per prompt the token log-probabilities of each of its
        continuations). The two calls apart; a backend may share work between them."""
        generations = self.generate(prompts, params, batch_size, seed, progress, stop_after_first_line)
        flat_ctx = [p for p, conts in zip(prompts, continuations, strict=True) for _ in conts]
        flat = self.continuation_logprobs(flat_ctx, [c for conts in continuations for c in conts], score_batch_size)
        out, k = [], 0
        for conts in continuations:
            out.append(flat[k : k + len(conts)])
            k += len(conts)
        return generations, out

    @contextmanager
    def for_generation(self) -> Iterator[ServedModel]:
        """This model, set up for a run of generation calls (transformers: the adapter merged)."""
        yield self

    def close(self) -> None:
        """Release what the model holds (engine, connections); the model is unusable afterwards."""


class TokenScoringModel(ServedModel):
    """A backend that scores token sequences (`_sequence_logprobs`): continuations are scored on
    the joined token ids, and the next-token distribution on the context with each candidate
    appended. The engine backends (vllm, openai) are of this kind."""

    def _sequence_logprobs(self, sequences: Sequence[tuple[list[int], int]], batch_size: int) -> list[list[float]]:
        """Per (token ids, n): the log-probabilities of the last n tokens, each given those before it."""
        raise NotImplementedError

    def continuation_logprobs(self, contexts, continuations, batch_size: int = 8) -> list[list[float]]:
        self.require("continuation_logprobs", "continuation_logprobs")
        return self._sequence_logprobs(scoring_sequences(self.tokenizer, contexts, continuations), batch_size)

    def next_token_distribution(self, contexts, candidate_tokens, batch_size: int = 8) -> list[list[float]]:
        self.require("next_token_distribution", "next_token_distribution")
        candidates = first_token_ids(self.tokenizer, candidate_tokens)
        sequences = []
        for context in contexts:
            ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            sequences += [(ids + [c], 1) for c in candidates]
        flat = self._sequence_logprobs(sequences, batch_size)
        k = len(candidates)
        return [renormalised([v[0] for v in flat[j * k : (j + 1) * k]]) for j in range(len(contexts))]


# Row k of a call seeded s samples from stream s * ROW_SEED_STRIDE + k: callers seed successive
# calls (batches) with s, s + 1, ..., and with s + k their rows would share streams across calls.
ROW_SEED_STRIDE = 1_000_003


def row_seed(seed: int, k: int) -> int:
    """The seed of row k of a generate call seeded `seed`, the same on every backend (kept below
    2**31 for engines that take 32-bit seeds)."""
    return (seed * ROW_SEED_STRIDE + k) % (2**31 - 1)


def mean_logprob(logprobs: Sequence[float]) -> float:
    """Mean per-token log-likelihood; NaN for a continuation with no scored token."""
    return sum(logprobs) / len(logprobs) if logprobs else math.nan


def renormalised(logprobs: Sequence[float]) -> list[float]:
    """Probabilities from log-probabilities of a few candidates, summing to 1 over them."""
    top = max(logprobs)
    if top == -math.inf:
        return [1.0 / len(logprobs)] * len(logprobs)
    weights = [math.exp(v - top) for v in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def first_token_ids(tokenizer, candidate_tokens: Sequence[str]) -> list[int]:
    """The first token id of each candidate (the judges' candidates are single tokens)."""
    ids = []
    for tok in candidate_tokens:
        encoded = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ValueError(f"the tokenizer encodes the candidate {tok!r} as nothing")
        ids.append(encoded[0])
    return ids


def render_prompt(tokenizer, user_text: str, assistant_prefix: str = "") -> str:
    """The user message in the model's chat template (if it has one), then the assistant prefix."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    else:
        rendered = user_text + "\n"
    return rendered + assistant_prefix


def scoring_sequences(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], int]]:
    """Per (context, continuation): the joined token ids and how many of the last positions to
    read (the continuation's tokens that have a token before them). Both are tokenized apart, as
    the transformers backend does, so every backend scores the same tokens."""
    out = []
    for context, continuation in zip(contexts, continuations, strict=True):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        out.append((ctx + cont, len(cont) if ctx else max(len(cont) - 1, 0)))
    return out
