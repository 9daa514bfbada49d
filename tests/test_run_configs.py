"""Every run config in configs/ is one the job accepts, field by field and by each stage's own rules
(train_batch_size divides the step, ...), and configs/gpu.yaml is the experiment's sizes with what a
7B model on one card needs."""

import typing
from pathlib import Path

import dagster as dg
import pydantic
import pytest
import yaml

from refine_af_pipeline.definitions import defs

pytestmark = pytest.mark.unit

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _job():
    return defs.resolve_job_def("refine_af_job")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _check_each_stage(job, run_config: dict) -> int:
    """Validate `run_config` against the job's schema, then build each stage's config class from
    the resolved values (the pydantic validators run there, at step start, not in the schema)."""
    resolved = dg.validate_run_config(job, run_config)["ops"]
    built = 0
    for name, section in resolved.items():
        config_class = typing.get_type_hints(job.graph.node_named(name).definition.compute_fn.decorated_fn).get(
            "config"
        )
        if config_class is not None:
            config_class(**section["config"])
            built += 1
    return built


def test_the_configs_folder_holds_the_profiles_and_the_gpu_config():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "experiment.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_run_config_validates_against_the_job(path):
    assert _check_each_stage(_job(), _load(path)) >= 15  # every configurable stage was built


def test_a_config_that_breaks_a_stage_rule_is_caught():
    config = _load(CONFIGS[0].parent / "gpu.yaml")
    config["ops"]["rl_refined_policy"]["config"]["train_batch_size"] = 3  # does not divide 8 x 4
    with pytest.raises(pydantic.ValidationError, match="must divide prompts_per_step x group_size"):
        _check_each_stage(_job(), config)
    config = _load(CONFIGS[0].parent / "gpu.yaml")
    config["ops"]["rl_refined_policy"]["config"]["gradient_checkpoint"] = True  # a misspelt field
    with pytest.raises(dg.DagsterInvalidConfigError):
        _check_each_stage(_job(), config)


def _contains(outer, inner) -> bool:
    if isinstance(inner, dict):
        return isinstance(outer, dict) and all(k in outer and _contains(outer[k], v) for k, v in inner.items())
    return outer == inner


def test_gpu_config_keeps_the_experiments_sizes_and_sets_what_a_7b_model_needs():
    configs_dir = CONFIGS[0].parent
    gpu, experiment = _load(configs_dir / "gpu.yaml"), _load(configs_dir / "experiment.yaml")
    # The model resource comes from the environment: a resources section would reset REFINE_AF_MODEL.
    assert set(gpu) == {"ops"}
    for op, section in experiment["ops"].items():
        assert _contains(gpu["ops"].get(op), section), op
    resolved = dg.validate_run_config(_job(), gpu)["ops"]
    rl = resolved["rl_refined_policy"]["config"]
    sft = resolved["sft_training_pairs"]["config"]["sft"]
    assert rl["gradient_checkpointing"] and sft["gradient_checkpointing"]
    assert not rl["use_vllm"]  # a third copy of the weights on the card
    assert rl["train_batch_size"] <= 2 and sft["train_batch_size"] <= 2  # a 24 GB card's slice
    defaults = dg.validate_run_config(_job(), {})["ops"]
    assert rl["learning_rate"] < defaults["rl_refined_policy"]["config"]["learning_rate"]
    assert sft["learning_rate"] < defaults["sft_training_pairs"]["config"]["sft"]["learning_rate"]
    # The environment variables its comments tell the user to set are ones model_resource reads.
    text = (configs_dir / "gpu.yaml").read_text()
    for var in (
        "REFINE_AF_MODEL",
        "REFINE_AF_DEVICE",
        "REFINE_AF_DTYPE",
        "REFINE_AF_BACKEND",
        "REFINE_AF_BATCH_SIZE",
        "REFINE_AF_SCORING_BATCH_SIZE",
        "REFINE_AF_VLLM_GPU_MEMORY_UTILIZATION",
        "REFINE_AF_MAX_BATCH_TOKENS",
    ):
        assert f"{var}=" in text, var


def test_gpu_config_environment_variables_reach_the_resource(monkeypatch):
    from refine_af_pipeline.definitions import model_resource

    for name, value in {
        "MODEL": "Qwen/Qwen2.5-7B-Instruct",
        "DEVICE": "cuda",
        "DTYPE": "bfloat16",
        "BACKEND": "transformers",
        "BATCH_SIZE": "256",
        "SCORING_BATCH_SIZE": "32",
        "VLLM_GPU_MEMORY_UTILIZATION": "0.45",
        "MAX_BATCH_TOKENS": "131072",
    }.items():
        monkeypatch.setenv(f"REFINE_AF_{name}", value)
    r = model_resource()
    assert (r.model, r.device, r.dtype, r.backend) == ("Qwen/Qwen2.5-7B-Instruct", "cuda", "bfloat16", "transformers")
    assert (r.batch_size, r.scoring_batch_size, r.vllm_gpu_memory_utilization, r.max_batch_tokens) == (
        256,
        32,
        0.45,
        131072,
    )
