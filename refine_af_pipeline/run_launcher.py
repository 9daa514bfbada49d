"""The run launcher of the project's Dagster instance (dagster.yaml): Dagster's default launcher
plus a health check of the process that runs each run, for the daemon's run monitoring.

Without it a run whose process died (SIGKILL, the OOM killer, a reboot) can stay STARTED and hold
the queue's single slot: the default launcher has no health check, and a `make run` (the CLI runs
the job in its own process) has no code server watching it either. Every run's RUN_START event
records the process that runs it; run monitoring (enabled in dagster.yaml) asks this launcher
about every STARTED run, and a run whose process is gone is marked failed, which frees the slot.

The check reads the process table of this machine, so it is right when the daemon runs on the
same host as the runs (`make ui`, `dagster dev`, or webserver and daemon started together), the
set-up this project's dagster.yaml is for.
"""

from __future__ import annotations

import os
import time

from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus

# A run with no recorded process yet is given this long from its start before it counts as lost.
NO_PROCESS_GRACE_S = 120.0
# A process that started more than this after the run's RUN_START event is another process that
# got the same id (the boot time in /proc/stat has whole-second resolution).
START_TIME_TOLERANCE_S = 5.0


def process_state(pid: int, started_by: float | None = None) -> str | None:
    """None while process `pid` is alive (and, if `started_by` is given, started no later than that
    epoch time); otherwise why not, in words."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "is gone"
    except PermissionError:
        pass  # exists, under another user
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS): signal 0 is all there is
        return None
    state, start_ticks = stat
    if state in ("Z", "X"):
        return "has exited (a zombie its parent has not reaped)"
    if started_by is not None:
        started = _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")
        if started > started_by + START_TIME_TOLERANCE_S:
            return "is gone (its id now belongs to a process that started after the run)"
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or parentheses itself.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])  # state (field 3), start time in clock ticks after boot (field 22)


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


class ProcessCheckingRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose run-worker health check looks at the run's process."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        records = self._instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.RUN_START, limit=1, ascending=False
        ).records
        entry = records[0].event_log_entry if records else None
        pid = entry.dagster_event.pid if entry is not None and entry.dagster_event is not None else None
        if pid is None:
            record = self._instance.get_run_record_by_id(run.run_id)
            started = record.start_time if record is not None else None
            if started is None or time.time() - started < NO_PROCESS_GRACE_S:
                return CheckRunHealthResult(WorkerStatus.RUNNING, "no process recorded for the run yet")
            return CheckRunHealthResult(
                WorkerStatus.NOT_FOUND, f"no process was recorded for the run within {NO_PROCESS_GRACE_S:.0f} s"
            )
        why = process_state(pid, entry.timestamp)
        if why is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"process {pid} is running")
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's process {pid} {why}")
