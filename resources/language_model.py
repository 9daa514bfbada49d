"""The language model as an injected resource: which weights, on which device, in which dtype."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from refine_af_pipeline.llm.adapters import AdapterView, attach_adapters
from refine_af_pipeline.llm.models import (
    EMBEDDED,
    ModelSource,
    check_model_available,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)


# The steps that call generate, by step (op) name: the keys stage_batch_sizes accepts.
GENERATION_STEPS = ("bootstrap_instructions", "reward_scores", "rl_heldout_comparison", "instance_output_pairs",
                    "selfinstruct_instance_pairs", "evaluation")


class LanguageModelResource(dg.ConfigurableResource):
    """`model`: "embedded" (SmolLM2-135M-Instruct from PyPI), a local directory, or a hub id.

    Two batch sizes, both separate from the trainers' batch sizes (in the RL and SFT configs):
    `batch_size` prompts per generate call, for every generation stage unless `stage_batch_sizes`
    names the stage; `scoring_batch_size` texts per forward-only scoring pass (judges,
    likelihoods), which holds logits over the vocabulary and so takes more memory per text."""

    model: str = EMBEDDED
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # Measured with the embedded model on 2 CPU cores (benchmarks/generation.py): 32 tokens/s at
    # batch 8, 66-77 from batch 48 to 96; 96 of the longest stage prompts need ~1.5 GB of KV cache.
    batch_size: int = Field(default=96, gt=0, description="prompts per generate call (every generation stage)")
    stage_batch_sizes: dict[str, int] = Field(
        default={}, description="per-step generation batch by step name, e.g. {evaluation: 32}")
    scoring_batch_size: int = Field(default=16, gt=0, description="texts per forward-only scoring pass")
    trust_remote_code: bool = False
    allow_download: bool = False
    cache_dir: str | None = None

    @field_validator("stage_batch_sizes")
    @classmethod
    def _positive_stage_batches(cls, sizes: dict[str, int]) -> dict[str, int]:
        bad = {stage: size for stage, size in sizes.items() if size <= 0}
        if bad:
            raise ValueError(f"stage batch sizes must be positive: {bad}")
        unknown = sorted(set(sizes) - set(GENERATION_STEPS))
        if unknown:
            raise ValueError(f"stage_batch_sizes names {unknown}, which generate nothing; the generation steps "
                             f"are {', '.join(GENERATION_STEPS)}")
        return sizes

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Runs when a step that needs the model starts: a wrong device, dtype or model fails the
        # step at once with a clear message, before any weights are read.
        self.check()

    def check(self) -> None:
        """ModelUnavailable for a device this machine lacks, an unknown dtype, or a model that is
        not there; loads nothing."""
        resolve_dtype(self.dtype, self.resolved_device())
        check_model_available(self.model, Path(self.cache_dir) if self.cache_dir else None, self.allow_download)

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def source(self) -> ModelSource:
        return resolve_model_source(self.model, Path(self.cache_dir) if self.cache_dir else None, self.allow_download)

    def generation_batch_size(self, stage: str) -> int:
        return self.stage_batch_sizes.get(stage, self.batch_size)

    def load(self, adapter: str | None = None):
        """(model, tokenizer, source, device). Each call gives a fresh copy of the weights."""
        device = self.resolved_device()
        source = self.source()
        tokenizer = load_tokenizer(source, self.trust_remote_code)
        model = load_causal_lm(source, device, resolve_dtype(self.dtype, device), self.trust_remote_code, adapter)
        return model, tokenizer, source, device

    def load_variants(self, adapters: Mapping[str, str | None]):
        """({label: model}, tokenizer, source, device) on one copy of the base weights: a label
        mapped to None is the base model, any other to the LoRA adapter at its path."""
        device = self.resolved_device()
        source = self.source()
        tokenizer = load_tokenizer(source, self.trust_remote_code)
        base = load_causal_lm(source, device, resolve_dtype(self.dtype, device), self.trust_remote_code)
        named = {label: path for label, path in adapters.items() if path is not None}
        if not named:
            return {label: base for label in adapters}, tokenizer, source, device
        shared = attach_adapters(base, named)
        return ({label: AdapterView(shared, label if path is not None else None) for label, path in adapters.items()},
                tokenizer, source, device)
