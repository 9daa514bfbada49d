"""A run whose process is killed is marked failed by the daemon's run monitoring and frees the run
queue's one slot, so the next queued run starts by itself (dagster.yaml, run_launcher.py).

The killed run is a CLI materialization (what `make run` does): it takes the queue's slot like any
run, and no code server watches its process, so only the launcher's health check can see it die."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient
from dagster_services import BIN, DagsterServices

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher reads /proc"),
]

HERE = Path(__file__).resolve().parent
LOCATION = "sleepy"
RUNS = "query { runsOrError { ... on Runs { results { runId status jobName } } } }"
RUN_MESSAGES = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId) { ... on EventConnection { events { ... on MessageEvent { message } } } }
}"""


def _runs(services) -> dict[str, str]:
    return {r["runId"]: r["status"] for r in services.graphql(RUNS)["runsOrError"]["results"]}


def _wait(what: str, predicate, timeout_s: float, services) -> float:
    """Seconds until predicate() held; fails with the services' logs after timeout_s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s; runs {_runs(services)}\n{services.log_tail()}")
        time.sleep(1)
    return time.monotonic() - started


@pytest.fixture
def services(tmp_path):
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        json.dumps(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": str(HERE / "sleepy_defs.py"),
                            "working_directory": str(HERE),
                            "location_name": LOCATION,
                        }
                    }
                ]
            }
        )
    )
    services = DagsterServices(tmp_path / "dagster_home", {}, workspace=workspace)
    services.start()
    try:
        yield services
    finally:
        services.stop()


def test_a_killed_run_fails_and_the_queued_run_starts_within_a_minute(services):
    services.wait_until_serving(timeout_s=300)
    client = DagsterGraphQLClient("127.0.0.1", port_number=services.port, timeout=60)
    cli = subprocess.Popen(
        [str(BIN / "dagster"), "asset", "materialize", "-f", str(HERE / "sleepy_defs.py"), "--select", "sleepy"],
        cwd=HERE,
        env=services.env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait("the CLI run starts", lambda: "STARTED" in _runs(services).values(), 120, services)
        [killed] = [r for r, s in _runs(services).items() if s == "STARTED"]
        queued = client.submit_job_execution(
            "sleepy_job",
            repository_location_name=LOCATION,
            repository_name="__repository__",
            run_config={"ops": {"sleepy": {"config": {"seconds": 1}}}},
        )
        time.sleep(20)  # the daemon dequeues every 5 s: the slot is taken, so the run waits
        assert _runs(services)[queued] == "QUEUED", _runs(services)
        os.killpg(cli.pid, signal.SIGKILL)  # the run's process and its step process
        cli.wait()
        seconds = _wait(
            "the killed run fails and the queued run leaves the queue",
            lambda: _runs(services)[killed] == "FAILURE" and _runs(services)[queued] != "QUEUED",
            60,
            services,
        )
        _wait("the queued run succeeds", lambda: _runs(services)[queued] == "SUCCESS", 120, services)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    messages = [e.get("message", "") for e in services.graphql(RUN_MESSAGES, {"runId": killed})["logsForRun"]["events"]]
    assert any("Detected run worker status" in m and "the run's process" in m for m in messages), messages[-5:]
    print(f"the killed run failed and the queued run started {seconds:.0f} s after the kill")
