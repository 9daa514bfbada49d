"""A fleet of OpenAI-compatible servers treated server by server (refine_af_pipeline/llm/fleet.py and
the openai backend's ServerPool): limits per server, seen from the servers' side; a server that dies
mid-stage is marked down and its requests answered by the others; a dead fleet fails in bounded
time; a server back up gets one probe, then its share."""

import http.server
import json
import logging
import threading
import time
from collections import Counter

import pytest

from refine_af_pipeline.llm.backend import SamplingParams
from refine_af_pipeline.llm.fleet import GENERATE, SCORE, Fleet
from refine_af_pipeline.llm.openai_backend import OpenAIServedModel, ServerError, ServerPool, ServerSettings
from refine_af_pipeline.llm.retry import Backoff

pytestmark = pytest.mark.unit

FLEET_LOG = "refine_af_pipeline.llm.fleet"


class FakeServer:
    """A completions server on a port of its own. It holds each request `hold_s`, answers prompt
    [k] with "answer k" (and log-probabilities when asked to echo), and records the requests in flight
    (the most at once), when each arrived and left, and the prompt ids it answered. `die_after(n, how)`
    makes it fail every request after the n-th: "503", "drop" (closes the connection unanswered) or
    "refused" (closes its port)."""

    def __init__(self, hold_s: float = 0.05):
        self.hold_s, self.lock = hold_s, threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.visits: list[list[float]] = []  # [arrived, left] per request, left 0 until it leaves
        self.answered: list[int] = []
        self.healthy_for: int | None = None  # requests it answers before dying (None: it lives)
        self.how = "503"
        self.failing = False  # fails every request while set
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                status, payload = owner.answer(body)
                if status is None:
                    self.close_connection = True  # no answer at all: the client sees the connection drop
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.closed = False

    def die_after(self, n: int, how: str) -> None:
        self.healthy_for, self.how = n, how

    def answer(self, body: dict):
        with self.lock:
            visit = [time.time(), 0.0]
            self.visits.append(visit)
            dead = self.failing or (self.healthy_for is not None and len(self.visits) > self.healthy_for)
            if dead:
                visit[1] = visit[0]
                if self.how == "refused" and not self.closed:
                    threading.Thread(target=self.close).start()
                return (503, {"error": {"message": "engine dead"}}) if self.how == "503" else (None, None)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.hold_s)
        ids = body["prompt"]
        with self.lock:
            # Counted out before the answer is written: the client cannot send the next request earlier.
            self.in_flight -= 1
            self.answered.append(ids[0])
            visit[1] = time.time()
        choice = {"text": f"answer {ids[0]}", "finish_reason": "stop"}
        if body.get("echo"):
            choice["logprobs"] = {"token_logprobs": [None] + [-0.5] * (len(ids) - 1)}
        return 200, {"choices": [choice], "usage": {"completion_tokens": 1}}

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fleet_servers():
    made: list[FakeServer] = []

    def make(n: int, hold_s: float = 0.05) -> list[FakeServer]:
        made.extend(FakeServer(hold_s) for _ in range(n))
        return made[-n:]

    yield make
    for server in made:
        server.close()


def tokenizer(text, add_special_tokens=False):
    return {"input_ids": [int(text.split()[-1])]}  # "prompt 7" -> [7]: the servers see which prompt it is


def served(servers, **settings) -> OpenAIServedModel:
    base = dict(concurrency=2, cooldown_s=0.3, max_cooldown_s=0.6, timeout_s=5.0, connect_timeout_s=1.0)
    pool = ServerPool(ServerSettings(tuple(s.url for s in servers), **{**base, **settings}))
    return OpenAIServedModel(pool, "m", tokenizer, "fake 1")


def most_at_once(*servers: FakeServer) -> int:
    """The most requests the servers held at once together, from their visits."""
    events = sorted((t, step) for s in servers for arrived, left in s.visits for t, step in ((arrived, 1), (left, -1)))
    held = most = 0
    for _, step in events:  # at equal times -1 sorts first: a request gone is not counted with the next
        held += step
        most = max(most, held)
    return most


def generate(model: OpenAIServedModel, n: int, start: int = 0):
    prompts = [f"prompt {k}" for k in range(start, start + n)]
    return model.generate(prompts, SamplingParams(max_new_tokens=1, do_sample=False), batch_size=8)


def test_each_server_holds_at_most_its_own_limit_and_every_server_fills_it(fleet_servers):
    a, b = fleet_servers(2)
    results = generate(served([a, b], concurrency=2), 40)
    assert [g.text for g in results] == [f"answer {k}" for k in range(40)]
    assert (a.most_in_flight, b.most_in_flight) == (2, 2)
    assert most_at_once(a, b) == 4
    assert sorted(a.answered + b.answered) == list(range(40))


def test_scoring_concurrency_is_a_limit_per_server(fleet_servers):
    a, b = fleet_servers(2)
    model = served([a, b], concurrency=4, scoring_concurrency=1)
    scores = model._sequence_logprobs([([k, 1, 2], 2) for k in range(20)], batch_size=8)
    assert scores == [[-0.5, -0.5]] * 20
    assert (a.most_in_flight, b.most_in_flight) == (1, 1)
    assert most_at_once(a, b) == 2  # not one sequence at a time over the whole fleet
    assert len(a.answered) >= 5 and len(b.answered) >= 5  # both used, one sequence at a time each


@pytest.mark.parametrize("how", ["503", "drop", "refused"])
def test_a_server_dying_mid_stage_is_set_aside_and_every_prompt_is_answered_once(fleet_servers, caplog, how):
    dead, alive = fleet_servers(2, hold_s=0.02)
    dead.die_after(4, how)
    model = served([dead, alive], cooldown_s=0.05, max_cooldown_s=0.1)  # probes during the stage
    sends: list[tuple[float, str]] = []
    send = model.pool._send
    model.pool._send = lambda method, url, body: sends.append((time.time(), url)) or send(method, url, body)
    with caplog.at_level(logging.INFO, logger=FLEET_LOG):
        results = generate(model, 30)
    assert [g.text for g in results] == [f"answer {k}" for k in range(30)]
    assert Counter(dead.answered + alive.answered) == Counter(range(30))  # each prompt answered once
    marked = [r for r in caplog.records if r.levelno == logging.WARNING and dead.url in r.getMessage()]
    assert marked and "marked down" in marked[0].getMessage() and alive.url not in caplog.text
    # After the marking only probes reach it, each logged as it fails (+1: the other of its 2 slots may
    # have been taken just before the marking and sent just after).
    probes = sum("still down" in r.getMessage() for r in marked)
    after = [t for t, url in sends if url.startswith(dead.url) and t > marked[0].created]
    assert len(after) <= probes + 1
    assert len([url for _, url in sends if url.startswith(dead.url)]) < 15  # round-robin would send it half


def test_a_dead_fleet_fails_in_bounded_time_naming_its_servers(fleet_servers):
    a, b = fleet_servers(2)
    a.die_after(0, "refused")
    b.die_after(0, "503")
    model = served([a, b], cooldown_s=0.1, max_cooldown_s=2.0)
    model.pool.backoff = Backoff(attempts=4, first_delay_s=0.05, factor=2.0)  # the pauses where all up failed it
    started = time.monotonic()
    with pytest.raises(ServerError) as failure:
        generate(model, 10)
    # A failed probe counts as a try of every request waiting for the fleet: about 4 cooldowns, not
    # one probe per request and try (that would take over 10 s here, and hours at the default cap).
    assert time.monotonic() - started < 6
    message = str(failure.value)
    assert message.startswith("POST /completions failed on ") and "after 4 tries; the last error: " in message
    assert message.endswith(f"servers down: {a.url}, {b.url}")


def test_a_server_back_up_after_its_cooldown_gets_one_probe_then_its_share(fleet_servers, caplog):
    back, steady = fleet_servers(2)
    back.failing = True
    model = served([back, steady], cooldown_s=0.2, max_cooldown_s=0.2)
    with caplog.at_level(logging.INFO, logger=FLEET_LOG):
        generate(model, 8)
        assert any("marked down" in r.getMessage() and back.url in r.getMessage() for r in caplog.records)
        back.failing = False
        time.sleep(0.3)
        seen = len(back.visits)
        assert [g.text for g in generate(model, 20, start=100)] == [f"answer {k}" for k in range(100, 120)]
    later = back.visits[seen:]
    assert len(later) >= 5  # it takes its share again
    probe = later[0]
    assert all(arrived >= probe[1] for arrived, _ in later[1:])  # nothing else while the probe was out
    assert back.most_in_flight == 2
    assert any(
        r.levelno == logging.INFO and "back up" in r.getMessage() and back.url in r.getMessage() for r in caplog.records
    )


def test_a_request_pinned_to_a_url_goes_there_only(fleet_servers):
    a, b = fleet_servers(2)
    model = served([a, b])
    for k in range(3):
        model.pool.request("POST", "/completions", {"prompt": [k]}, url=b.url)
    assert (len(a.visits), len(b.visits)) == (0, 3)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_cooldown_doubles_per_failed_probe_up_to_its_cap_and_a_success_resets_it():
    clock = Clock()
    fleet = Fleet(["http://a/v1"], {GENERATE: 2, SCORE: 1}, down_after=2, cooldown_s=5, max_cooldown_s=12, clock=clock)
    server = fleet.servers[0]
    for _ in range(2):
        fleet.release(fleet.acquire(GENERATE), GENERATE, False, "refused")
    cooldowns = [server.down_until - clock.now]
    for _ in range(3):
        clock.now = server.down_until
        probe = fleet.acquire(SCORE)
        assert probe.probe_out and not fleet.servers[0].can_take(GENERATE, 2, clock.now)  # one probe at a time
        fleet.release(probe, SCORE, False, "refused")
        cooldowns.append(server.down_until - clock.now)
    assert cooldowns == [5, 10, 12, 12]
    clock.now = server.down_until
    fleet.release(fleet.acquire(GENERATE), GENERATE, True)
    assert server.is_up and server.failures == server.markings == 0
    fleet.release(fleet.acquire(GENERATE), GENERATE, False, "refused")
    assert server.is_up  # one failure is not `down_after` in a row
