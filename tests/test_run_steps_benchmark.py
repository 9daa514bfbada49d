"""benchmarks/run_steps.py reads a finished run's step times and peaks from the event log."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@dg.asset
def first_table() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"peak_rss_mib": 100.4, "kept_rows": 7})


@dg.asset(deps=[first_table])
def second_table() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"peak_rss_mib": 250.0})


def test_it_prints_every_step_with_its_peak_and_the_run_totals(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert dg.materialize([first_table, second_table], instance=instance).success
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_steps.py"), "--metadata"],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("first_table", "second_table"))}
    assert rows["first_table"][-1] == "100" and rows["second_table"][-1] == "250"
    assert "    first_table.kept_rows = 7" in lines
    assert lines[-1].startswith("run_steps: wall=") and lines[-1].endswith("peak_rss_mib=250")


def test_an_empty_instance_is_an_error_that_names_it(tmp_path):
    home = tmp_path / "empty_home"
    home.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_steps.py")],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and f"no runs in {home}" in result.stderr
