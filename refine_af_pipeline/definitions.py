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
    SCHEDULE_PROFILE_VAR,
    profile_run_config,
    schedule_profile,
    with_bootstrap_seed,
)
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse

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


def model_resource(
    prefix: str = "REFINE_AF",
    fallback: str | None = None,
    default_model: str = "embedded",
    default_backend: str = "auto",
) -> LanguageModelResource:
    """A language model from the environment: {prefix}_MODEL, _DEVICE, _DTYPE, _BACKEND, _BASE_URLS,
    _SERVED_MODEL, _API_KEY; an unset variable falls back to `fallback`'s (the expert model reads
    REFINE_AF_EXPERT_*, else the base model's settings), then to the defaults."""

    def env(name: str, default=None):
        value = os.environ.get(f"{prefix}_{name}")
        if value is None and fallback:
            value = os.environ.get(f"{fallback}_{name}")
        return value if value is not None else default

    key_var = next((f"{p}_API_KEY" for p in (prefix, fallback) if p and os.environ.get(f"{p}_API_KEY")), None)
    return LanguageModelResource(
        model=env("MODEL", default_model),
        device=env("DEVICE", "auto"),
        dtype=env("DTYPE", "auto"),
        backend=env("BACKEND", default_backend),
        base_urls=[u.strip() for u in env("BASE_URLS", "").split(",") if u.strip()],
        served_model_name=env("SERVED_MODEL") or None,
        # Read when a step starts; Dagster shows the variable's name, never its value.
        api_key=dg.EnvVar(key_var) if key_var else None,
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


def regeneration_run_config(day: datetime, profile: str) -> dict:
    """A nightly run's config: the profile's, with the bootstrap seeded by the date, so each night
    samples new prompts and new generation noise (a fixed seed would repeat the last night's)."""
    return with_bootstrap_seed(profile_run_config(profile), int(day.strftime("%Y%m%d")))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dg.schedule(
    job=refine_af_job,
    cron_schedule="0 3 * * *",
    name="refine_af_regeneration",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly: grow the instruction pool and retrain downstream stages, sized by the profile "
    f"{SCHEDULE_PROFILE_VAR} names (demo on a CPU, method on a GPU unless set).",
)
def regeneration_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = context.scheduled_execution_time
    # Resolved at the tick, not at import: the check touches the CUDA driver, which the forkserver
    # must not have done before it forks the steps.
    profile = schedule_profile(_cuda_available())
    # One run per night: a tick evaluated twice (daemon restart) finds the run key taken.
    return dg.RunRequest(
        run_key=f"regeneration-{day:%Y-%m-%d}",
        run_config=regeneration_run_config(day, profile),
        tags={"refine_af/trigger": "schedule", "refine_af/profile": profile},
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
