"""Runs a command (torchrun) in its own process group and ends it when the process that started this
one dies: a Dagster step killed with SIGKILL cannot stop its children, and an orphaned torchrun
would go on training into the checkpoint folder the re-run of the step resumes from.

    python -m refine_af_pipeline.training.parent_guard LOCK_FILE -- COMMAND ...

While the command runs this process holds an exclusive lock on LOCK_FILE; a second guard on the
same file (a re-run while an old trainer still lives) fails at once, naming the file. SIGTERM and
SIGINT (Dagster Pipes forwards a step's interruption) are passed on to the command's group."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0
GRACE_S = 20.0


def main(argv: list[str]) -> int:
    lock_file, command = Path(argv[0]), argv[argv.index("--") + 1 :]
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_file.open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another trainer holds {lock_file}: an earlier run's training is still alive", file=sys.stderr)
        return 75
    parent = os.getppid()
    child = subprocess.Popen(command, start_new_session=True)

    def stop(signum, _frame=None):
        _end(child, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None:
        if os.getppid() != parent:  # the step that started us is gone
            print("the launching step died: stopping the trainers", file=sys.stderr)
            _end(child, signal.SIGTERM)
            break
        time.sleep(POLL_S)
    return child.wait()


def _end(child: subprocess.Popen, signum: int) -> None:
    """The signal to the command's whole group, then SIGKILL after a grace period."""
    if child.poll() is not None:
        return
    os.killpg(child.pid, signum)
    deadline = time.monotonic() + GRACE_S
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
