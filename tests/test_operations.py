"""How the pipeline is operated: the regeneration schedule and the Dagster instance settings that
the README's DAGSTER_HOME gets (run queue, concurrency pools, telemetry, captured logs)."""

import copy
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from refine_af_pipeline import definitions
from refine_af_pipeline.definitions import defs
from refine_af_pipeline.profiles import (
    PROFILES,
    SCHEDULE_POOL_VAR,
    SCHEDULE_PROFILE_VAR,
    ProfileError,
    profile_run_config,
    with_bootstrap_seed,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def _tick(when: datetime) -> list[dg.RunRequest]:
    schedule = defs.get_schedule_def("refine_af_regeneration")
    with dg.build_schedule_context(scheduled_execution_time=when) as context:
        return schedule.evaluate_tick(context).run_requests


def test_regeneration_tick_on_a_cpu_runs_the_demo_profile_with_a_seed_per_night(monkeypatch):
    monkeypatch.delenv(SCHEDULE_PROFILE_VAR, raising=False)
    monkeypatch.setattr(definitions, "_cuda_available", lambda: False)
    schedule = defs.get_schedule_def("refine_af_regeneration")
    assert schedule.job_name == "refine_af_job" and schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    [request] = _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    assert request.job_name in (None, "refine_af_job")
    assert request.asset_selection is None  # the job's own selection: every asset
    assert request.run_key == "regeneration-2026-11-24"
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    expected = copy.deepcopy(demo)
    expected["ops"]["bootstrap_instructions"]["config"]["seed"] = 20261124
    assert request.run_config == expected
    assert request.tags["refine_af/trigger"] == "schedule" and request.tags["refine_af/profile"] == "demo"
    [next_night] = _tick(datetime(2026, 11, 25, 3, 0, tzinfo=UTC))
    assert next_night.run_key != request.run_key
    assert next_night.run_config["ops"]["bootstrap_instructions"]["config"]["seed"] == 20261125


@pytest.mark.parametrize(
    ("setting", "cuda", "profile"),
    [("", True, "method"), ("experiment", False, "experiment"), ("method", False, "method")],
)
def test_the_schedule_profile_is_a_setting_with_the_method_scale_only_on_a_gpu(monkeypatch, setting, cuda, profile):
    monkeypatch.setenv(SCHEDULE_PROFILE_VAR, setting)
    monkeypatch.setattr(definitions, "_cuda_available", lambda: cuda)
    [request] = _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    assert request.tags["refine_af/profile"] == profile
    expected = with_bootstrap_seed(profile_run_config(profile), 20261124)
    assert request.run_config == expected
    if profile == "method":  # the config defaults: only the night's seed is set
        assert request.run_config == {"ops": {"bootstrap_instructions": {"config": {"seed": 20261124}}}}


def test_the_schedule_grows_the_pool_the_variable_names_and_tags_the_run(monkeypatch):
    monkeypatch.setenv(SCHEDULE_POOL_VAR, "nightly-fleet")
    [request] = _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    assert request.run_config["ops"]["bootstrap_instructions"]["config"]["pool"] == "nightly-fleet"
    assert request.tags["refine_af/pool"] == "nightly-fleet"
    monkeypatch.setenv(SCHEDULE_POOL_VAR, "")  # unset: the pool of the seeds and the model, no tag
    [request] = _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    assert "pool" not in request.run_config["ops"]["bootstrap_instructions"]["config"]
    assert "refine_af/pool" not in request.tags
    monkeypatch.setenv(SCHEDULE_POOL_VAR, "my pool")
    with pytest.raises(dg.DagsterUserCodeExecutionError) as info:
        _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    assert f"{SCHEDULE_POOL_VAR}: pool name 'my pool' is not usable" in str(info.value.__cause__)


def test_an_unknown_schedule_profile_fails_the_tick_naming_the_choices(monkeypatch):
    monkeypatch.setenv(SCHEDULE_PROFILE_VAR, "laptop")
    with pytest.raises(dg.DagsterUserCodeExecutionError) as info:
        _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    assert isinstance(info.value.__cause__, ProfileError)
    assert "unknown run profile 'laptop': choose one of demo, experiment, method" in str(info.value.__cause__)


@pytest.mark.parametrize("profile", PROFILES)
def test_the_job_is_every_asset_and_accepts_each_profiles_tick_config(monkeypatch, profile):
    monkeypatch.setenv(SCHEDULE_PROFILE_VAR, profile)
    job = defs.resolve_job_def("refine_af_job")
    every_asset = set(defs.resolve_asset_graph().get_all_asset_keys())
    assert set(job.asset_layer.executable_asset_keys) == every_asset
    [request] = _tick(datetime(2026, 11, 24, 3, 0, tzinfo=UTC))
    validated = dg.validate_run_config(job, request.run_config)
    assert validated["ops"]["bootstrap_instructions"]["config"]["seed"] == 20261124


@pytest.mark.parametrize("profile", ["demo", "experiment"])
def test_each_sized_profile_has_a_job_whose_launchpad_config_is_its_file(profile):
    job = defs.resolve_job_def(f"refine_af_{profile}_job")
    assert set(job.asset_layer.executable_asset_keys) == set(defs.resolve_asset_graph().get_all_asset_keys())
    from_file = yaml.safe_load((ROOT / "configs" / f"{profile}.yaml").read_text())
    # The job runs with the file's sizes when launched without a config of its own.
    assert dg.validate_run_config(job, {}) == dg.validate_run_config(defs.resolve_job_def("refine_af_job"), from_file)


def test_instance_settings_queue_one_run_and_one_step_per_pool(tmp_path):
    # The file the Makefile copies into DAGSTER_HOME, loaded the way dagster loads it.
    subprocess.run(["make", "-s", f"DAGSTER_HOME={tmp_path}", f"{tmp_path}/dagster.yaml"], cwd=ROOT, check=True)
    assert (tmp_path / "dagster.yaml").read_text() == (ROOT / "dagster.yaml").read_text()
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 1
        assert instance.global_op_concurrency_default_limit == 1
        assert not instance.telemetry_enabled
        assert type(instance.run_launcher).__name__ == "ProcessCheckingRunLauncher"
        assert instance.run_launcher.supports_check_run_worker_health
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_monitoring_poll_interval_seconds <= 15
    finally:
        instance.dispose()
    settings = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    # Retry warnings from the core (logger refine_af_pipeline.*) reach the run's event log.
    assert "refine_af_pipeline" in settings["python_logs"]["managed_python_loggers"]


def test_a_retried_batch_shows_in_the_run_log(tmp_path):
    from refine_af_pipeline.llm.retry import Backoff, call_with_retry

    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    failures = []

    def flaky():
        if not failures:
            failures.append(1)
            raise ConnectionResetError("connection reset by the model server (simulated)")
        return 1

    @dg.asset
    def generation_stage():
        return call_with_retry(flaky, "generation batch 1/2", Backoff(first_delay_s=0))

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        result = dg.materialize([generation_stage], instance=instance)
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
    assert result.success
    assert any(
        "generation batch 1/2 failed (try 1 of 3: ConnectionResetError: "
        "connection reset by the model server (simulated))" in m
        for m in messages
    ), messages[-5:]
