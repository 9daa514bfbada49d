"""The openai backend's HTTP side against small local HTTP servers: which answers are retried,
round-robin over a fleet, the API key sent and never shown. (The engine side is tested against a
real vLLM server in test_openai_backend.py.)"""

import http.server
import json
import threading

import pytest

from refine_af_pipeline.llm.openai_backend import ServerError, ServerPool, ServerSettings

pytestmark = pytest.mark.unit


class Scripted:
    """An HTTP server answering POSTs with the next (status, body) of `script` (the last repeats);
    it records the paths and Authorization headers it saw."""

    def __init__(self, script):
        self.script, self.seen = list(script), []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.seen.append((self.path, self.headers.get("Authorization")))
                status, body = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def servers():
    made = []
    yield lambda script: made.append(Scripted(script)) or made[-1]
    for s in made:
        s.close()


def _pool(*urls, **extra) -> ServerPool:
    settings = dict(attempts=3, **extra)
    pool = ServerPool(ServerSettings(tuple(urls), **settings))
    pool.backoff = type(pool.backoff)(attempts=3, first_delay_s=0.01, factor=1.0)
    return pool


@pytest.mark.parametrize("status", [429, 500, 503])
def test_rate_limits_and_server_errors_are_retried(servers, status):
    server = servers([(status, {"error": {"message": "busy"}}), (200, {"ok": 1})])
    assert _pool(server.url).request("POST", "/completions", {}) == {"ok": 1}
    assert len(server.seen) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 409])
def test_other_errors_fail_at_once_with_the_url_and_the_servers_message(servers, status):
    server = servers([(status, {"error": {"message": "model 'x' is not served"}})])
    with pytest.raises(ServerError, match=f"{server.url}/completions answered {status}: model 'x' is not served"):
        _pool(server.url).request("POST", "/completions", {})
    assert len(server.seen) == 1


def test_retries_give_up_after_the_bound_naming_every_url_tried(servers):
    a, b = servers([(503, {})]), servers([(502, {})])
    with pytest.raises(ServerError, match=f"failed on {a.url}, {b.url} after 3 tries"):
        _pool(a.url, b.url).request("POST", "/completions", {})


def test_requests_go_round_robin_over_the_fleet(servers):
    fleet = [servers([(200, {})]) for _ in range(3)]
    pool = _pool(*(s.url for s in fleet))
    for _ in range(6):
        pool.request("POST", "/completions", {})
    assert [len(s.seen) for s in fleet] == [2, 2, 2]


def test_the_api_key_is_sent_and_never_shown(servers):
    server = servers([(401, {"error": {"message": "bad key"}})])
    pool = _pool(server.url, api_key="sk-secret-123")
    with pytest.raises(ServerError) as failure:
        pool.request("POST", "/completions", {})
    assert server.seen[0][1] == "Bearer sk-secret-123"
    assert "sk-secret" not in str(failure.value) and "sk-secret" not in repr(pool.settings)
