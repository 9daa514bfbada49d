"""model_resource: every backend setting a GPU box or a fleet needs has an environment variable, and
a value that does not parse fails naming the variable."""

import pytest

from refine_af_pipeline.definitions import EnvSettingError, model_resource

pytestmark = pytest.mark.unit

FLEET = {
    "CONCURRENCY": ("concurrency", "64", 64),
    "SCORING_CONCURRENCY": ("scoring_concurrency", "1", 1),
    "BATCH_SIZE": ("batch_size", "128", 128),
    "SCORING_BATCH_SIZE": ("scoring_batch_size", " 48 ", 48),
    "MAX_BATCH_TOKENS": ("max_batch_tokens", "65536", 65536),
    "REQUEST_ATTEMPTS": ("request_attempts", "6", 6),
    "VLLM_MAX_MODEL_LEN": ("vllm_max_model_len", "4096", 4096),
    "REQUEST_TIMEOUT_S": ("request_timeout_s", "600", 600.0),
    "VLLM_GPU_MEMORY_UTILIZATION": ("vllm_gpu_memory_utilization", "0.45", 0.45),
    "SERVER_LOGPROBS": ("server_logprobs", "false", False),
    "LOAD_ADAPTERS_ON_SERVER": ("load_adapters_on_server", "0", False),
    "RAY_ACTORS": ("ray_actors", "4", 4),
    "RAY_CPUS_PER_ACTOR": ("ray_cpus_per_actor", "2", 2),
    "RAY_GPUS_PER_ACTOR": ("ray_gpus_per_actor", "1", 1.0),
    "RAY_ADDRESS": ("ray_address", "10.0.0.5:6379", "10.0.0.5:6379"),
    "RAY_INNER_BACKEND": ("ray_inner_backend", "vllm", "vllm"),
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    import os

    for var in [v for v in os.environ if v.startswith("REFINE_AF_")]:
        monkeypatch.delenv(var)


@pytest.mark.parametrize("name", FLEET)
def test_each_variable_sets_its_field(monkeypatch, name):
    field, raw, value = FLEET[name]
    default = getattr(model_resource(), field)
    assert default != value  # the variable changes something
    monkeypatch.setenv(f"REFINE_AF_{name}", raw)
    assert getattr(model_resource(), field) == value


def test_unset_or_blank_variables_leave_the_field_defaults(monkeypatch):
    monkeypatch.setenv("REFINE_AF_SCORING_CONCURRENCY", "  ")
    r = model_resource()
    assert (r.concurrency, r.scoring_concurrency, r.batch_size, r.scoring_batch_size) == (8, None, 96, 16)


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("CONCURRENCY", "eight", "REFINE_AF_CONCURRENCY must be a positive integer, got 'eight'"),
        ("SCORING_CONCURRENCY", "1.5", "REFINE_AF_SCORING_CONCURRENCY must be a positive integer, got '1.5'"),
        ("BATCH_SIZE", "0", "REFINE_AF_BATCH_SIZE must be a positive integer, got '0'"),
        ("SCORING_BATCH_SIZE", "-4", "REFINE_AF_SCORING_BATCH_SIZE must be a positive integer, got '-4'"),
        ("REQUEST_TIMEOUT_S", "5m", "REFINE_AF_REQUEST_TIMEOUT_S must be a positive number, got '5m'"),
        ("REQUEST_TIMEOUT_S", "nan", "REFINE_AF_REQUEST_TIMEOUT_S must be a positive number, got 'nan'"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "45", "REFINE_AF_VLLM_GPU_MEMORY_UTILIZATION is a share"),
        ("SERVER_LOGPROBS", "maybe", "REFINE_AF_SERVER_LOGPROBS must be true or false"),
    ],
)
def test_a_value_that_does_not_parse_names_the_variable(monkeypatch, name, raw, message):
    monkeypatch.setenv(f"REFINE_AF_{name}", raw)
    with pytest.raises(EnvSettingError) as info:
        model_resource()
    assert message in str(info.value)


def test_the_expert_falls_back_to_the_base_models_variables_and_names_its_own_in_errors(monkeypatch):
    monkeypatch.setenv("REFINE_AF_SCORING_CONCURRENCY", "1")
    monkeypatch.setenv("REFINE_AF_CONCURRENCY", "32")
    monkeypatch.setenv("REFINE_AF_EXPERT_CONCURRENCY", "4")
    expert = model_resource("REFINE_AF_EXPERT", fallback="REFINE_AF")
    assert (expert.concurrency, expert.scoring_concurrency) == (4, 1)
    # The audit judge has no fallback: the base model's fleet settings are not its own.
    audit = model_resource("REFINE_AF_AUDIT", default_backend="transformers")
    assert (audit.concurrency, audit.scoring_concurrency) == (8, None)
    monkeypatch.setenv("REFINE_AF_EXPERT_BATCH_SIZE", "big")
    with pytest.raises(EnvSettingError, match="REFINE_AF_EXPERT_BATCH_SIZE must be a positive integer"):
        model_resource("REFINE_AF_EXPERT", fallback="REFINE_AF")


def test_a_fleet_with_lora_servers_from_the_environment(monkeypatch):
    # The fleet of docs/engines.md, "Running against a fleet", set entirely from the environment.
    monkeypatch.setenv("REFINE_AF_BASE_URLS", "http://gpu-1:8000/v1, http://gpu-2:8000/v1")
    monkeypatch.setenv("REFINE_AF_SERVED_MODEL", "qwen-7b")
    monkeypatch.setenv("REFINE_AF_CONCURRENCY", "32")
    monkeypatch.setenv("REFINE_AF_SCORING_CONCURRENCY", "1")
    monkeypatch.setenv("REFINE_AF_BATCH_SIZE", "64")
    monkeypatch.setenv("REFINE_AF_SCORING_BATCH_SIZE", "64")
    r = model_resource()
    assert r.resolved_backend() == "openai"
    settings = r._server_settings()
    assert settings.base_urls == ("http://gpu-1:8000/v1", "http://gpu-2:8000/v1")
    assert (settings.concurrency, settings.scoring_concurrency) == (32, 1)
    assert (r.batch_size, r.scoring_batch_size) == (64, 64)
