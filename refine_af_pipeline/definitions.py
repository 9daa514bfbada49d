"""The one place that assembles the Dagster Definitions: assets, checks, resources, job, schedule."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import dagster as dg

from assets import (
    checks,
    data_audit,
    evaluation,
    exports,
    finetune,
    instance_pairs,
    instructions,
    query_ledger,
    reward_model,
    rewards,
    rl_heldout,
    rl_policy,
    seed_pool,
    teams,
    verdict,
)
from refine_af_pipeline.llm.models import EMBEDDED_GEMMA
from refine_af_pipeline.profiles import (
    METHOD,
    PROFILES,
    SCHEDULE_POOL_VAR,
    SCHEDULE_PROFILE_VAR,
    profile_run_config,
    schedule_pool,
    schedule_profile,
    with_bootstrap_seed,
)
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.training_launcher import training_launcher_from_env

STAGE_MODULES = [
    seed_pool,
    instructions,
    reward_model,
    rewards,
    rl_policy,
    rl_heldout,
    instance_pairs,
    teams,
    finetune,
    data_audit,
    evaluation,
    query_ledger,
    verdict,
    exports,
]


def data_dir() -> Path:
    """REFINE_AF_DATA_DIR, else a folder in DAGSTER_HOME, else ./data."""
    if os.environ.get("REFINE_AF_DATA_DIR"):
        return Path(os.environ["REFINE_AF_DATA_DIR"])
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]) / "refine_af_data"
    return Path("data")


# Resource fields a GPU box or a fleet sets from the environment: {prefix}_<NAME> -> field, by type.
# A run config's `resources: {language_model: {config: ...}}` replaces the whole resource config,
# the environment's model and URLs included (fields it leaves out go back to their defaults), so
# these variables are the way to size the model resource and keep them.
_INT_VARS = {
    "BATCH_SIZE": "batch_size",
    "SCORING_BATCH_SIZE": "scoring_batch_size",
    "MAX_BATCH_TOKENS": "max_batch_tokens",
    "CONCURRENCY": "concurrency",
    "SCORING_CONCURRENCY": "scoring_concurrency",
    "REQUEST_ATTEMPTS": "request_attempts",
    "VLLM_MAX_MODEL_LEN": "vllm_max_model_len",
    "RAY_ACTORS": "ray_actors",
    "RAY_CPUS_PER_ACTOR": "ray_cpus_per_actor",
}
_FLOAT_VARS = {
    "REQUEST_TIMEOUT_S": "request_timeout_s",
    "VLLM_GPU_MEMORY_UTILIZATION": "vllm_gpu_memory_utilization",
    # Positive when set: 0 GPUs is the field's default (leave the variable unset).
    "RAY_GPUS_PER_ACTOR": "ray_gpus_per_actor",
}
_BOOL_VARS = {"SERVER_LOGPROBS": "server_logprobs", "LOAD_ADAPTERS_ON_SERVER": "load_adapters_on_server"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class EnvSettingError(ValueError):
    """An environment variable of the model resource that does not parse; names the variable."""


def _parsed(var: str, raw: str, name: str):
    text = raw.strip()
    if name in _INT_VARS:
        try:
            value = int(text)
        except ValueError:
            raise EnvSettingError(f"{var} must be a positive integer, got {raw!r}") from None
        if value <= 0:
            raise EnvSettingError(f"{var} must be a positive integer, got {raw!r}")
        return value
    if name in _FLOAT_VARS:
        try:
            value = float(text)
        except ValueError:
            raise EnvSettingError(f"{var} must be a positive number, got {raw!r}") from None
        if not value > 0 or value == float("inf"):
            raise EnvSettingError(f"{var} must be a positive number, got {raw!r}")
        if name == "VLLM_GPU_MEMORY_UTILIZATION" and value > 1:
            raise EnvSettingError(f"{var} is a share of the GPU's memory, above 0 and at most 1; got {raw!r}")
        return value
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    raise EnvSettingError(f"{var} must be true or false (1/0, yes/no, on/off), got {raw!r}")


def model_resource(
    prefix: str = "REFINE_AF",
    fallback: str | None = None,
    default_model: str = "embedded",
    default_backend: str = "auto",
) -> LanguageModelResource:
    """A language model from the environment: {prefix}_MODEL, _DEVICE, _DTYPE, _BACKEND, _BASE_URLS,
    _SERVED_MODEL, _API_KEY; the sizes a GPU box or a fleet sets: _BATCH_SIZE, _SCORING_BATCH_SIZE,
    _MAX_BATCH_TOKENS, _CONCURRENCY, _SCORING_CONCURRENCY (1 against vLLM servers with --enable-lora),
    _REQUEST_TIMEOUT_S, _REQUEST_ATTEMPTS, _SERVER_LOGPROBS, _LOAD_ADAPTERS_ON_SERVER,
    _VLLM_GPU_MEMORY_UTILIZATION, _VLLM_MAX_MODEL_LEN; the ray backend's _RAY_ADDRESS,
    _RAY_INNER_BACKEND, _RAY_ACTORS, _RAY_CPUS_PER_ACTOR, _RAY_GPUS_PER_ACTOR (the resource fields of
    the same names). An unset variable falls back to `fallback`'s (the expert model reads
    REFINE_AF_EXPERT_*, else the base model's settings), then to the field's default; a value that
    does not parse fails the code location's load with EnvSettingError naming the variable."""

    def env(name: str, default=None):
        value = os.environ.get(f"{prefix}_{name}")
        if value is None and fallback:
            value = os.environ.get(f"{fallback}_{name}")
        return value if value is not None else default

    def set_var(name: str) -> str | None:
        """The variable that sets `name` ({prefix}_, else {fallback}_); a blank one counts as unset."""
        return next(
            (f"{p}_{name}" for p in (prefix, fallback) if p and os.environ.get(f"{p}_{name}", "").strip()), None
        )

    sizes = {
        field: _parsed(found, os.environ[found], name)
        for name, field in {**_INT_VARS, **_FLOAT_VARS, **_BOOL_VARS}.items()
        if (found := set_var(name)) is not None
    }
    key_var = next((f"{p}_API_KEY" for p in (prefix, fallback) if p and os.environ.get(f"{p}_API_KEY")), None)
    return LanguageModelResource(
        model=env("MODEL", default_model),
        device=env("DEVICE", "auto"),
        dtype=env("DTYPE", "auto"),
        backend=env("BACKEND", default_backend),
        base_urls=[u.strip() for u in env("BASE_URLS", "").split(",") if u.strip()],
        served_model_name=env("SERVED_MODEL") or None,
        ray_address=env("RAY_ADDRESS") or None,
        ray_inner_backend=env("RAY_INNER_BACKEND", "transformers"),
        # Read when a step starts; Dagster shows the variable's name, never its value.
        api_key=dg.EnvVar(key_var) if key_var else None,
        **sizes,
    )


def default_resources(root: Path | None = None) -> dict:
    root = Path(root or data_dir()).resolve()
    return {
        "warehouse": Warehouse(database=str(root / "refine_af.duckdb")),
        "artifact_store": ArtifactStore(root=str(root / "artifacts")),
        "language_model": model_resource(),
        # TeaMs-RL's expert (executes the learned chains, answers them): the base model unless
        # REFINE_AF_EXPERT_* (or the resource's config) points it at a larger or served model.
        "expert_model": model_resource("REFINE_AF_EXPERT", fallback="REFINE_AF"),
        "feedback_scorer": FeedbackScorerResource(),
        # The audit judge: weights the policy never trained against (REFINE_AF_AUDIT_* to change).
        # In process by default: a 270M scorer beside a vLLM engine would ask vLLM for a second share of the GPU.
        "audit_model": model_resource("REFINE_AF_AUDIT", default_model=EMBEDDED_GEMMA, default_backend="transformers"),
        # Where RL and SFT train: in the step, or torchrun processes (REFINE_AF_TRAINING_LAUNCHER).
        "training_launcher": training_launcher_from_env(),
    }


all_assets = dg.load_assets_from_modules(STAGE_MODULES)
all_checks = dg.load_asset_checks_from_modules([checks])

WHOLE_GRAPH = (
    "Materialize the whole REFINE-AF graph: seeds, the learned reward, the four arms (REFINE-AF, the "
    "Self-Instruct baseline, the best-of-N control, TeaMs-RL), their equal SFT draws, the audit, the "
    "evaluation, the verdict, the query ledger and the dataset exports"
)

refine_af_job = dg.define_asset_job(
    "refine_af_job",
    selection=dg.AssetSelection.all(),
    description=f"{WHOLE_GRAPH}, at the method's scale (the config defaults).",
)

# One job per sized profile, its launchpad filled from the same configs/<profile>.yaml as make run /
# make experiment.
profile_jobs = [
    dg.define_asset_job(
        f"refine_af_{name}_job",
        selection=dg.AssetSelection.all(),
        config=profile_run_config(name),
        description=f"{WHOLE_GRAPH}, sized by the {name} profile (configs/{name}.yaml).",
        tags={"refine_af/profile": name},
    )
    for name in PROFILES
    if name != METHOD
]


def regeneration_run_config(day: datetime, profile: str, pool: str = "") -> dict:
    """A nightly run's config: the profile's, with the bootstrap seeded by the date, so each night
    samples new prompts and new generation noise (a fixed seed would repeat the last night's), and
    growing `pool` where one is named."""
    return with_bootstrap_seed(profile_run_config(profile), int(day.strftime("%Y%m%d")), pool)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dg.schedule(
    job=refine_af_job,
    cron_schedule="0 3 * * *",
    name="refine_af_regeneration",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly: grow the instruction pool and retrain downstream stages, sized by the profile "
    f"{SCHEDULE_PROFILE_VAR} names (demo on a CPU, method on a GPU unless set), growing the pool "
    f"{SCHEDULE_POOL_VAR} names (unless set, the one the seed set and the model name).",
)
def regeneration_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = context.scheduled_execution_time
    # Resolved at the tick, not at import: the check touches the CUDA driver, which the forkserver
    # must not have done before it forks the steps.
    profile, pool = schedule_profile(_cuda_available()), schedule_pool()
    # One run per night: a tick evaluated twice (daemon restart) finds the run key taken.
    return dg.RunRequest(
        run_key=f"regeneration-{day:%Y-%m-%d}",
        run_config=regeneration_run_config(day, profile, pool),
        tags={"refine_af/trigger": "schedule", "refine_af/profile": profile}
        | ({"refine_af/pool": pool} if pool else {}),
    )


# Steps fork from a server that has imported the heavy libraries once, instead of each step paying
# for the imports. Importing does not start torch's thread pools or touch CUDA, so forking is safe.
FORKSERVER_PRELOAD = ["refine_af_pipeline.definitions", "torch", "transformers", "peft", "trl", "sentence_transformers"]


# One step at a time unless the run config says otherwise: every model step is in the one-slot
# "gpu" pool anyway, and a step waiting for a taken slot polls with a backoff of up to 15 s (Dagster's
# InstanceConcurrencyContext), while with one step at a time the next claims the slot as the last
# ends. Several GPUs: raise the pool limit and max_concurrent together.
DEFAULT_MAX_CONCURRENT = 1


def _forkserver_by_default(config: dict) -> dict:
    """Dagster's default executor config, with forkserver as the multiprocess start method and one
    step at a time unless the run config chooses otherwise (or in_process)."""
    if "in_process" in config:
        return {"in_process": config["in_process"]}
    multiprocess = dict(config.get("multiprocess") or {})
    if multiprocess.get("start_method") is None:
        multiprocess["start_method"] = {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}
    if multiprocess.get("max_concurrent") is None:
        multiprocess["max_concurrent"] = DEFAULT_MAX_CONCURRENT
    return {"multiprocess": multiprocess}


step_executor = dg.multi_or_in_process_executor.configured(
    _forkserver_by_default, config_schema=dg.multi_or_in_process_executor.config_schema.as_field()
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    resources=default_resources(),
    jobs=[refine_af_job, *profile_jobs],
    schedules=[regeneration_schedule],
    executor=step_executor,
)
