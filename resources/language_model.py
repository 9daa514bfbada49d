"""The language model as an injected resource: which weights, on which device, in which dtype."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field, PrivateAttr

from refine_af_pipeline.llm.adapters import AdapterView, attach_adapters
from refine_af_pipeline.llm.backend import ServedModel
from refine_af_pipeline.llm.generation import MAX_BATCH_TOKENS
from refine_af_pipeline.llm.models import (
    EMBEDDED,
    ModelSource,
    ModelUnavailable,
    check_model_available,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from refine_af_pipeline.llm.openai_backend import OpenAIFleet, ServerSettings
from refine_af_pipeline.llm.ray_backend import (
    RAY_INSTALL,
    RaySettings,
    ReplicaPool,
    ReplicaSpec,
    open_ray_pool,
    ray_available,
)
from refine_af_pipeline.llm.transformers_backend import TransformersModel
from refine_af_pipeline.llm.vllm_backend import open_vllm_models, vllm_available

_VLLM_INSTALL = "pip install '.[vllm]' on a CUDA machine; README, Generation engines"


@dataclass(frozen=True)
class BackendChoice:
    requested: str  # the resource's `backend` field
    backend: str  # the engine it resolves to
    reason: str

    def __str__(self) -> str:
        return f"{self.requested} -> {self.backend}: {self.reason}"


def choose_backend(
    requested: str,
    base_urls: Sequence[str],
    device: Callable[[], str],
    vllm_installed: Callable[[], bool],
    ray_installed: Callable[[], bool] = ray_available,
    ray_plan: str = "",
) -> BackendChoice:
    """The engine a `backend` setting resolves to on this machine, and why. `device` gives the
    resolved device and `vllm_installed` whether vllm imports; each is asked only when the answer
    depends on it (importing vllm takes seconds). "ray" is only ever chosen by name (`ray_plan`
    says where its actors run). ModelUnavailable for a backend that cannot run."""
    if requested == "ray":
        if not ray_installed():
            raise ModelUnavailable(f"backend 'ray' was requested but ray is not installed here ({RAY_INSTALL})")
        return BackendChoice(requested, "ray", f"requested ({ray_plan})" if ray_plan else "requested")
    if requested == "openai" or (requested == "auto" and base_urls):
        if not base_urls:
            raise ModelUnavailable("backend 'openai' needs base_urls (e.g. [http://127.0.0.1:8000/v1])")
        servers = f"{len(base_urls)} server{'s' if len(base_urls) > 1 else ''}"
        why = "requested" if requested == "openai" else "base_urls are set"
        return BackendChoice(requested, "openai", f"{why} ({servers}: {', '.join(base_urls)})")
    if requested == "vllm":
        if not vllm_installed():
            raise ModelUnavailable(f"backend 'vllm' was requested but vllm does not import here ({_VLLM_INSTALL})")
        return BackendChoice(requested, "vllm", "requested, and vllm imports")
    if requested == "transformers":
        return BackendChoice(requested, "transformers", "requested")
    resolved = device()
    if not resolved.startswith("cuda"):
        return BackendChoice(
            requested,
            "transformers",
            f"no base_urls and the device is {resolved}, not CUDA (vllm is chosen only on a CUDA device)",
        )
    if not vllm_installed():
        return BackendChoice(
            requested,
            "transformers",
            f"no base_urls; a CUDA device is present ({resolved}) but vllm does not import here ({_VLLM_INSTALL})",
        )
    return BackendChoice(
        requested, "vllm", f"no base_urls; vllm is installed and a CUDA device is present ({resolved})"
    )


class LanguageModelResource(dg.ConfigurableResource):
    """`model`: "embedded" (SmolLM2-135M-Instruct from PyPI), a local directory, or a hub id.

    `backend` is the engine every generation and likelihood read goes through (README,
    "Generation engines"): "transformers" in the step process; "vllm", vLLM's offline engine in
    the step process; "openai", any OpenAI-compatible server at `base_urls` (a list is a fleet,
    each server holding at most `concurrency` requests); "ray", `ray_actors` replicas of the model
    on a Ray cluster, each call's rows split over them (docs/engines.md, "Ray: generation on a
    cluster"). "auto" is openai when
    base_urls are set, vllm on CUDA when vLLM is installed, transformers otherwise (never ray).
    Training (RL, SFT) loads `model` where the training_launcher resource says (the step process,
    torchrun processes or Ray Train workers); with the openai backend `model` must be the served
    model's weights or tokenizer.

    Two batch sizes, both separate from the trainers' batch sizes (in the RL and SFT configs):
    `batch_size` prompts per generate call, for every generation stage whose config leaves
    `generation_batch_size` at 0; `scoring_batch_size` texts per forward-only scoring pass (judges,
    likelihoods), which holds logits over the vocabulary and so takes more memory per text."""

    model: str = EMBEDDED
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # Measured with the embedded model on 2 CPU cores (benchmarks/generation.py): 32 tokens/s at
    # batch 8, 66-77 from batch 48 to 96; 96 of the longest stage prompts need ~1.5 GB of KV cache.
    batch_size: int = Field(default=96, gt=0, description="prompts per generate call (every generation stage)")
    scoring_batch_size: int = Field(default=16, gt=0, description="texts per forward-only scoring pass")
    max_batch_tokens: int = Field(
        default=MAX_BATCH_TOKENS,
        gt=0,
        description=(
            "transformers backend: key/value cache positions (rows x width) a generation batch may reach; long prompts "
            "then run in fewer rows (the embedded model in fp32 holds 46 KB per position: 1.5 GB at the default)"
        ),
    )
    trust_remote_code: bool = False
    allow_download: bool = False
    cache_dir: str | None = None
    backend: Literal["auto", "transformers", "vllm", "openai", "ray"] = Field(
        default="auto", description="generation engine: auto | transformers | vllm | openai | ray"
    )
    base_urls: list[str] = Field(
        default=[],
        description=("openai backend: server URLs ending in /v1, e.g. [http://10.0.0.5:8000/v1]; several form a fleet"),
    )
    api_key: str | None = Field(
        default=None, description=("openai backend: bearer token, best given as an EnvVar (never logged or recorded)")
    )
    served_model_name: str | None = Field(
        default=None,
        description=(
            "openai backend: the model name the servers serve (default: the first model the first server lists)"
        ),
    )
    concurrency: int = Field(default=8, gt=0, description="openai backend: requests in flight at once on each server")
    scoring_concurrency: int | None = Field(
        default=None,
        gt=0,
        description=(
            "openai backend: log-probability requests in flight at once on each server (default: concurrency); 1 for a "
            "vLLM server with LoRA enabled, whose engine dies when prompt log-probabilities of several requests share "
            "a batch (vLLM issues #29955, #16668)"
        ),
    )
    request_timeout_s: float = Field(default=300.0, gt=0, description="openai backend: seconds one request may take")
    request_attempts: int = Field(
        default=4,
        gt=0,
        description=(
            "openai backend: tries per request (connection errors, timeouts, 429 and 5xx are retried with backoff)"
        ),
    )
    server_logprobs: bool = Field(
        default=True,
        description=(
            "openai backend: the servers return prompt log-probabilities (echo + logprobs); false for one that does "
            "not, and the likelihood-based judges then refuse at step start"
        ),
    )
    load_adapters_on_server: bool = Field(
        default=True,
        description=(
            "openai backend: load a pipeline-trained LoRA adapter the servers do not serve yet through vLLM's "
            "/v1/load_lora_adapter (needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and the folder "
            "visible to the server)"
        ),
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "vllm backend: share of GPU memory the engine may take (the step's trainer or judges need the rest)"
        ),
    )
    vllm_max_model_len: int | None = Field(default=None, description="vllm backend: context length cap")
    ray_address: str | None = Field(
        default=None,
        description=(
            "ray backend: the cluster to join, host:port of its head (or ray://host:10001); unset: RAY_ADDRESS as "
            "Ray reads it, else a local Ray started for the step"
        ),
    )
    ray_inner_backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="ray backend: the engine in each actor (vllm: give each actor a GPU with ray_gpus_per_actor 1)",
    )
    ray_actors: int = Field(
        default=2,
        gt=0,
        description="ray backend: actors, each one replica of the model; a call's rows are split over them",
    )
    ray_cpus_per_actor: int = Field(
        default=1, gt=0, description="ray backend: CPUs Ray reserves for each actor, also its torch threads"
    )
    ray_gpus_per_actor: float = Field(default=0.0, ge=0, description="ray backend: GPUs per actor (0 on CPU nodes)")

    _opened: list = PrivateAttr(default_factory=list)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Runs when a step that needs the model starts: a wrong device, dtype or model fails the
        # step at once with a clear message, before any weights are read. The step's log then says
        # which engine serves it and why (an "auto" setting resolves differently per machine).
        self.check()
        if context.log is not None:
            context.log.info(f"language model {self.model}: backend {self.backend_choice()}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def check(self) -> None:
        """ModelUnavailable for a device this machine lacks, an unknown dtype, a model that is not
        there, or a backend that cannot run here; loads nothing and sends nothing."""
        resolve_dtype(self.dtype, self.resolved_device())
        check_model_available(self.model, Path(self.cache_dir) if self.cache_dir else None, self.allow_download)
        self.resolved_backend()

    def resolved_backend(self) -> str:
        return self.backend_choice().backend

    def backend_choice(self) -> BackendChoice:
        """The engine `backend` resolves to here, and why (choose_backend)."""
        plan = self._ray_settings().summary() if self.backend == "ray" else ""
        return choose_backend(self.backend, self.base_urls, self.resolved_device, vllm_available, ray_plan=plan)

    def open_models(self, adapters: Mapping[str, str | None]) -> dict[str, ServedModel]:
        """{label: model} for inference through the chosen backend, one copy of the base model
        for all of them: a label mapped to None is the base model, any other to the LoRA adapter
        at its path. Closed when the step ends (or by `close`)."""
        backend = self.resolved_backend()
        source = self.source()
        if backend == "openai":
            fleet = OpenAIFleet(
                self._server_settings(),
                load_tokenizer(source, self.trust_remote_code),
                self.served_model_name,
                self.load_adapters_on_server,
            )
            self._opened.append(fleet)
            return {label: fleet.model(path) for label, path in adapters.items()}
        if backend == "ray":
            return self._ray_pool(adapters).models(adapters)
        if backend == "vllm":
            models, engine = open_vllm_models(
                source.path,
                source.model_id,
                adapters,
                dtype=self.dtype,
                gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                max_model_len=self.vllm_max_model_len,
            )
            self._opened.append(engine)
            return models
        variants, tokenizer, source, _ = self.load_variants(adapters)
        return {
            label: TransformersModel(model, tokenizer, source.model_id, max_batch_tokens=self.max_batch_tokens)
            for label, model in variants.items()
        }

    def judge_model(self, policy_base: AdapterView, tokenizer, source: ModelSource) -> ServedModel:
        """The base-model judge of a step that trains `policy_base`'s model in process: the
        trained weights with the adapter off under transformers (no second copy), the base model
        on the chosen engine otherwise."""
        if self.resolved_backend() == "transformers":
            return TransformersModel(policy_base, tokenizer, source.model_id, max_batch_tokens=self.max_batch_tokens)
        return self.open_models({"judge": None})["judge"]

    def close(self) -> None:
        while self._opened:
            self._opened.pop().close()

    def _ray_pool(self, adapters: Mapping[str, str | None]) -> ReplicaPool:
        """The step's Ray actors: started by its first open_models, reused by the later ones (which
        may add adapters) and killed when the step ends."""
        pool = next((o for o in self._opened if isinstance(o, ReplicaPool)), None)
        if pool is None:
            tokenizer = load_tokenizer(self.source(), self.trust_remote_code)
            pool = open_ray_pool(self._replica_spec(), self._ray_settings(), tokenizer, adapters)
            self._opened.append(pool)
        return pool

    def _ray_settings(self) -> RaySettings:
        return RaySettings(
            self.ray_address, self.ray_inner_backend, self.ray_actors, self.ray_cpus_per_actor, self.ray_gpus_per_actor
        )

    def _replica_spec(self) -> ReplicaSpec:
        return ReplicaSpec(
            self.model,
            self.cache_dir,
            self.allow_download,
            self.trust_remote_code,
            self.device,
            self.dtype,
            self.max_batch_tokens,
            self.vllm_gpu_memory_utilization,
            self.vllm_max_model_len,
        )

    def _server_settings(self) -> ServerSettings:
        return ServerSettings(
            tuple(self.base_urls),
            self.api_key,
            self.concurrency,
            self.scoring_concurrency,
            self.request_timeout_s,
            attempts=self.request_attempts,
            logprobs=self.server_logprobs,
        )

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def source(self) -> ModelSource:
        return resolve_model_source(self.model, Path(self.cache_dir) if self.cache_dir else None, self.allow_download)

    def generation_batch_size(self, stage_batch_size: int = 0) -> int:
        """A stage's generation batch: its config's generation_batch_size, or this resource's."""
        return stage_batch_size or self.batch_size

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
        return (
            {label: AdapterView(shared, label if path is not None else None) for label, path in adapters.items()},
            tokenizer,
            source,
            device,
        )
