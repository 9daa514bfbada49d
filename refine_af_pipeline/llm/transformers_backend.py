"""The transformers backend: a Hugging Face causal LM in the step process (the CPU default).

It is the only backend that can also train: the RL and SFT stages hand its `model` to TRL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import generation as hf
from .adapters import merged
from .backend import ALL_CAPABILITIES, Generation, ProgressFn, Provenance, SamplingParams, ServedModel
from .prefix_scoring import generate_and_score_continuations


def transformers_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


class TransformersModel(ServedModel):
    """`model` (a transformers model or an AdapterView of a PEFT model) with its tokenizer."""

    capabilities = ALL_CAPABILITIES

    def __init__(
        self,
        model,
        tokenizer,
        served_model: str,
        engine_version: str | None = None,
        max_batch_tokens: int = hf.MAX_BATCH_TOKENS,
    ):
        self.model, self.tokenizer, self.max_batch_tokens = model, tokenizer, max_batch_tokens
        self.provenance = Provenance("transformers", engine_version or transformers_version(), served_model)

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        batch_size: int = 8,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        stop_after_first_line: bool = False,
    ) -> list[Generation]:
        return hf.generate(
            self.model,
            self.tokenizer,
            prompts,
            params,
            batch_size,
            seed,
            progress,
            stop_after_first_line=stop_after_first_line,
            max_batch_tokens=self.max_batch_tokens,
        )

    def continuation_logprobs(self, contexts, continuations, batch_size: int = 8) -> list[list[float]]:
        return hf.continuation_logprobs(self.model, self.tokenizer, contexts, continuations, batch_size)

    def next_token_distribution(self, contexts, candidate_tokens, batch_size: int = 8) -> list[list[float]]:
        return hf.next_token_distribution(self.model, self.tokenizer, contexts, candidate_tokens, batch_size)

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
        # One prefill of each prompt serves both the answer and the scored continuations.
        return generate_and_score_continuations(
            self.model,
            self.tokenizer,
            prompts,
            continuations,
            params,
            batch_size,
            seed,
            progress,
            stop_after_first_line,
            score_batch_size=score_batch_size,
            max_batch_tokens=self.max_batch_tokens,
        )

    @contextmanager
    def for_generation(self) -> Iterator[ServedModel]:
        # An adapter is merged for the generation only: a judge may be the same weights with the adapter off.
        with merged(self.model) as view:
            yield TransformersModel(
                view,
                self.tokenizer,
                self.provenance.served_model,
                self.provenance.engine_version,
                self.max_batch_tokens,
            )
