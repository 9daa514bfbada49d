"""dagster-webserver and dagster-daemon as the user starts them, for the live UI test: on loopback,
a free port, a temporary DAGSTER_HOME with the repository's dagster.yaml."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterServices:
    """Starts both processes in new sessions (process groups); stop() ends them and every process
    they started (code servers, run workers, step processes)."""

    def __init__(self, home: Path, env: dict[str, str], workspace: Path = ROOT / "workspace.yaml"):
        self.home, self.port, self.workspace = home, free_port(), workspace
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
        self.env = {**os.environ, "DAGSTER_HOME": str(home), **env}
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = {name: home / f"{name}.log" for name in ("webserver", "daemon")}

    def start(self) -> None:
        # Create the SQLite storage first: the webserver and the daemon each create missing tables on
        # start, and racing each other one of them fails with "table jobs already exists" (seen in CI).
        subprocess.run(
            [str(BIN / "dagster"), "instance", "migrate"], cwd=ROOT, env=self.env, check=True, stdout=subprocess.DEVNULL
        )
        workspace = ["-w", str(self.workspace)]
        self._spawn("webserver", [str(BIN / "dagster-webserver"), *workspace, "-h", "127.0.0.1", "-p", str(self.port)])
        self._spawn("daemon", [str(BIN / "dagster-daemon"), "run", *workspace])

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.logs[name], "w")
        self.processes[name] = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {name} log ---\n{path.read_text(errors='replace')[-chars:]}"
            for name, path in self.logs.items()
            if path.exists()
        )

    def wait_until_serving(self, timeout_s: float) -> dict:
        """/server_info's answer, once the webserver gives one."""
        deadline = time.monotonic() + timeout_s
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}\n{self.log_tail()}")
            try:
                response = requests.get(f"{self.url}/server_info", timeout=5)
                if response.ok:
                    return response.json()
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/server_info did not answer within {timeout_s} s\n{self.log_tail()}")
            time.sleep(1)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def stop(self) -> None:
        """SIGTERM to each process group and every descendant, SIGKILL to what is left after 20 s."""
        procs = []
        for process in self.processes.values():
            try:
                procs += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:  # descendants that moved to a session of their own
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for process in self.processes.values():
            process.wait(timeout=10)
