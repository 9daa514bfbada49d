"""The one place that assembles the Dagster Definitions: assets, checks, resources, job, schedule."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import dagster as dg

from assets import (checks, evaluation, exports, finetune, instance_pairs, instructions, rewards, rl_heldout, rl_policy,
                    seed_pool)
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse

STAGE_MODULES = [seed_pool, instructions, rewards, rl_policy, rl_heldout, instance_pairs, finetune, evaluation, exports]


def data_dir() -> Path:
    """REFINE_AF_DATA_DIR, else a folder in DAGSTER_HOME, else ./data."""
    if os.environ.get("REFINE_AF_DATA_DIR"):
        return Path(os.environ["REFINE_AF_DATA_DIR"])
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]) / "refine_af_data"
    return Path("data")


def default_resources(root: Path | None = None) -> dict:
    root = Path(root or data_dir()).resolve()
    return {
        "warehouse": Warehouse(database=str(root / "refine_af.duckdb")),
        "artifact_store": ArtifactStore(root=str(root / "artifacts")),
        "language_model": LanguageModelResource(
            model=os.environ.get("REFINE_AF_MODEL", "embedded"),
            device=os.environ.get("REFINE_AF_DEVICE", "auto"),
            dtype=os.environ.get("REFINE_AF_DTYPE", "auto"),
            backend=os.environ.get("REFINE_AF_BACKEND", "auto"),
            base_urls=[u.strip() for u in os.environ.get("REFINE_AF_BASE_URLS", "").split(",") if u.strip()],
            served_model_name=os.environ.get("REFINE_AF_SERVED_MODEL") or None,
            # Read when a step starts; Dagster shows the variable's name, never its value.
            api_key=dg.EnvVar("REFINE_AF_API_KEY") if os.environ.get("REFINE_AF_API_KEY") else None,
        ),
        "feedback_scorer": FeedbackScorerResource(),
    }


all_assets = dg.load_assets_from_modules(STAGE_MODULES)
all_checks = dg.load_asset_checks_from_modules([checks])

refine_af_job = dg.define_asset_job(
    "refine_af_job",
    selection=dg.AssetSelection.all(),
    description="Materialize the whole REFINE-AF graph: seeds, both branches (REFINE-AF and the Self-Instruct "
                "baseline), their evaluation and the dataset exports.",
)


def regeneration_run_config(day: datetime) -> dict:
    """A nightly run's config: the defaults, with the bootstrap seeded by the date, so each night
    samples new prompts and new generation noise (a fixed seed would repeat the last night's)."""
    return {"ops": {"bootstrap_instructions": {"config": {"seed": int(day.strftime("%Y%m%d"))}}}}


@dg.schedule(job=refine_af_job, cron_schedule="0 3 * * *", name="refine_af_regeneration",
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Nightly: grow the instruction pool and retrain downstream stages.")
def regeneration_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = context.scheduled_execution_time
    # One run per night: a tick evaluated twice (daemon restart) finds the run key taken.
    return dg.RunRequest(run_key=f"regeneration-{day:%Y-%m-%d}", run_config=regeneration_run_config(day),
                         tags={"refine_af/trigger": "schedule"})


# Steps preloaded by the forkserver: a spawned step spent ~6 s importing torch, transformers and
# TRL before its first line, and a run has 15 steps. Importing does not start torch's thread pools
# or touch CUDA, so forking after it is safe.
FORKSERVER_PRELOAD = ["refine_af_pipeline.definitions", "torch", "transformers", "peft", "trl", "sentence_transformers"]


def _forkserver_by_default(config: dict) -> dict:
    """Dagster's default executor config, with forkserver as the multiprocess start method unless
    the run config chooses one (or in_process)."""
    if "in_process" in config:
        return {"in_process": config["in_process"]}
    multiprocess = dict(config.get("multiprocess") or {})
    if multiprocess.get("start_method") is None:
        multiprocess["start_method"] = {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}
    return {"multiprocess": multiprocess}


step_executor = dg.multi_or_in_process_executor.configured(
    _forkserver_by_default, config_schema=dg.multi_or_in_process_executor.config_schema.as_field())

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    resources=default_resources(),
    jobs=[refine_af_job],
    schedules=[regeneration_schedule],
    executor=step_executor,
)
