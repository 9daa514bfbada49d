"""`backend: auto` resolves per machine; the choice and its reason go to the step's log."""

from types import SimpleNamespace

import pytest

from refine_af_pipeline.llm.models import ModelUnavailable
from resources import LanguageModelResource
from resources.language_model import choose_backend

pytestmark = pytest.mark.unit


def _never():
    raise AssertionError("asked although the answer does not depend on it")


def _choice(requested, base_urls=(), device="cpu", vllm=False):
    return choose_backend(
        requested,
        list(base_urls),
        (lambda: device) if device is not None else _never,
        (lambda: vllm) if vllm is not None else _never,
    )


def test_auto_with_cuda_and_vllm_picks_vllm():
    c = _choice("auto", device="cuda", vllm=True)
    assert c.backend == "vllm"
    assert str(c) == "auto -> vllm: no base_urls; vllm is installed and a CUDA device is present (cuda)"


def test_auto_with_cuda_but_no_vllm_says_vllm_does_not_import():
    c = _choice("auto", device="cuda:1", vllm=False)
    assert c.backend == "transformers"
    assert str(c).startswith("auto -> transformers: ")
    assert "a CUDA device is present (cuda:1) but vllm does not import here" in c.reason
    assert "pip install '.[vllm]'" in c.reason


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_without_cuda_picks_transformers_without_importing_vllm(device):
    c = _choice("auto", device=device, vllm=None)  # vllm is not asked: importing it takes seconds
    assert c.backend == "transformers"
    assert f"the device is {device}, not CUDA" in c.reason


def test_auto_with_base_urls_picks_openai_before_looking_at_the_device():
    c = _choice("auto", base_urls=["http://a:8000/v1", "http://b:8000/v1"], device=None, vllm=None)
    assert c.backend == "openai"
    assert str(c) == "auto -> openai: base_urls are set (2 servers: http://a:8000/v1, http://b:8000/v1)"


def test_explicit_backends_say_requested():
    assert str(_choice("transformers", device=None, vllm=None)) == "transformers -> transformers: requested"
    assert str(_choice("vllm", device=None, vllm=True)) == "vllm -> vllm: requested, and vllm imports"
    assert _choice("openai", base_urls=["http://a/v1"]).reason == "requested (1 server: http://a/v1)"


def test_explicit_backends_that_cannot_run_fail():
    with pytest.raises(ModelUnavailable, match="vllm does not import here"):
        _choice("vllm", vllm=False)
    with pytest.raises(ModelUnavailable, match="needs base_urls"):
        _choice("openai")


def test_step_start_logs_the_choice_and_its_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    lines = []
    context = SimpleNamespace(log=SimpleNamespace(info=lines.append))
    LanguageModelResource(model=str(tmp_path), device="cpu").setup_for_execution(context)
    assert lines == [f"language model {tmp_path}: backend auto -> transformers: " + _choice("auto").reason]
    assert LanguageModelResource(model=str(tmp_path), device="cpu").resolved_backend() == "transformers"
