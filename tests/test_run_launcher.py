"""The instance's run launcher tells run monitoring whether a STARTED run's process is alive
(refine_af_pipeline/run_launcher.py), on runs and RUN_START events made by hand."""

import logging
import os
import subprocess
import sys
import time
import uuid

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.launcher import WorkerStatus

from refine_af_pipeline.run_launcher import ProcessCheckingRunLauncher, process_state

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


def _launcher(instance) -> ProcessCheckingRunLauncher:
    launcher = ProcessCheckingRunLauncher()
    launcher.register_instance(instance)
    return launcher


def _started_run(instance, pid: int | None, started_at: float | None = None) -> dg.DagsterRun:
    run = instance.add_run(dg.DagsterRun(job_name="job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED))
    if pid is not None:
        instance.store_event(
            EventLogEntry(
                error_info=None,
                level=logging.DEBUG,
                user_message="",
                run_id=run.run_id,
                timestamp=started_at or time.time(),
                dagster_event=DagsterEvent(DagsterEventType.RUN_START.value, job_name="job", pid=pid),
            )
        )
    return run


def _exited_child_pid(reap: bool) -> tuple[int, subprocess.Popen]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    if reap:
        child.wait()
        return child.pid, child
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited, not reaped: a zombie (Popen.poll would reap it)
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return child.pid, child
        time.sleep(0.05)
    raise AssertionError("the child did not exit")


def test_a_run_whose_process_is_alive_is_running(instance):
    health = _launcher(instance).check_run_worker_health(_started_run(instance, os.getpid()))
    assert health.status == WorkerStatus.RUNNING, health


def test_a_run_whose_process_is_gone_has_failed(instance):
    pid, _ = _exited_child_pid(reap=True)
    health = _launcher(instance).check_run_worker_health(_started_run(instance, pid))
    assert health.status == WorkerStatus.FAILED and f"process {pid} is gone" in health.msg, health


def test_a_zombie_process_counts_as_gone(instance):
    pid, child = _exited_child_pid(reap=False)
    try:
        assert process_state(pid) is not None
        health = _launcher(instance).check_run_worker_health(_started_run(instance, pid))
        assert health.status == WorkerStatus.FAILED and "zombie" in health.msg, health
    finally:
        child.wait()


def test_a_process_id_reused_by_a_later_process_counts_as_gone(instance):
    # This test process started long after a run that began an hour ago with the same id.
    health = _launcher(instance).check_run_worker_health(_started_run(instance, os.getpid(), time.time() - 3600))
    assert health.status == WorkerStatus.FAILED and "started after the run" in health.msg, health


def test_a_run_without_a_recorded_process_gets_a_grace_period(instance):
    health = _launcher(instance).check_run_worker_health(_started_run(instance, None))
    assert health.status == WorkerStatus.RUNNING, health
