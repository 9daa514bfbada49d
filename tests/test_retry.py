"""Bounded retry with backoff around model backend calls (refine_af_pipeline/llm/retry.py)."""

import pytest

from refine_af_pipeline.llm.backend import SamplingParams
from refine_af_pipeline.llm.generation import generate
from refine_af_pipeline.llm.retry import Backoff, RetriesExhausted, call_with_retry, is_transient

pytestmark = pytest.mark.graph


class Flaky:
    """Raises `error` on the first `failures` calls, then returns `value`."""

    def __init__(self, failures: int, error: BaseException, value="done"):
        self.failures, self.error, self.value, self.calls = failures, error, value, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.value


def test_transient_errors_are_retried_with_growing_pauses():
    pauses = []
    flaky = Flaky(2, RuntimeError("CUDA out of memory. Tried to allocate 64.00 MiB"))
    assert call_with_retry(flaky, "batch 1/1", Backoff(attempts=3, first_delay_s=2, factor=2), pauses.append) == "done"
    assert flaky.calls == 3 and pauses == [2, 4]


def test_the_bound_is_kept_and_the_last_error_is_named():
    pauses = []
    flaky = Flaky(10, OSError("Input/output error reading model.safetensors"))
    with pytest.raises(
        RetriesExhausted, match=r"batch 3/5 failed 4 times; the last error: OSError: Input/output"
    ) as info:
        call_with_retry(
            flaky, "batch 3/5", Backoff(attempts=4, first_delay_s=1, factor=10, max_delay_s=30), pauses.append
        )
    assert flaky.calls == 4 and pauses == [1, 10, 30]
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad prompt"),
        RuntimeError("The size of tensor a (8) must match the size of tensor b (9)"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),  # the context is lost for good
        FileNotFoundError(2, "No such file or directory", "model.safetensors"),
        PermissionError(13, "Permission denied", "/models"),
        OSError(28, "No space left on device"),
    ],
)
def test_errors_that_are_not_transient_are_raised_at_once(error):
    pauses = []
    flaky = Flaky(1, error)
    with pytest.raises(type(error)):
        call_with_retry(flaky, "batch", Backoff(), pauses.append)
    assert flaky.calls == 1 and pauses == []


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"),
        RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)"),
        OSError(5, "Input/output error"),
        OSError("Input/output error reading model.safetensors"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("read timed out"),
    ],
)
def test_transient_errors_are_recognised(error):
    assert is_transient(error)
    flaky = Flaky(1, error)
    assert call_with_retry(flaky, "batch", Backoff(first_delay_s=0), lambda s: None) == "done"
    assert flaky.calls == 2


def test_torch_out_of_memory_is_transient():
    import torch

    assert is_transient(torch.OutOfMemoryError("CUDA out of memory"))


def test_a_custom_rule_replaces_the_default():
    flaky = Flaky(1, KeyError("x"))
    assert (
        call_with_retry(
            flaky, "batch", Backoff(first_delay_s=0, retry_on=lambda e: isinstance(e, KeyError)), lambda s: None
        )
        == "done"
    )


def test_generate_retries_a_failing_forward_pass_and_gives_the_same_text(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    prompts = ["<|im_start|>user\nList tasks<|im_end|>\n<|im_start|>assistant\n"] * 3
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    expected = generate(model, tokenizer, prompts, params, batch_size=2)
    real, calls = model.forward, []

    def fails_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    model.forward = fails_twice
    got = generate(model, tokenizer, prompts, params, batch_size=2, backoff=Backoff(attempts=3, first_delay_s=0))
    assert got == expected
    assert len(calls) > 3  # the prefill: two failures and a success; then the decode steps
    model.forward = Flaky(5, TimeoutError("model server did not answer"))
    with pytest.raises(RetriesExhausted, match="prefill of 2 prompts failed 3 times"):
        generate(model, tokenizer, prompts, params, batch_size=2, backoff=Backoff(attempts=3, first_delay_s=0))
