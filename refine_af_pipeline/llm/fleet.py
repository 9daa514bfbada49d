"""Which server of a fleet takes the next request: slots per server and kind of request, and the
health of each server.

Each server takes at most `limits[kind]` requests of a kind at once (generation and scoring have
their own limits: a vLLM server with LoRA must score one sequence at a time, but may generate many).
A request takes a slot on the server with the fewest requests in flight (ties in turn) and waits
while every server is full. A server whose requests fail transiently `down_after` times in a row is
marked down for a cooldown (doubling with each marking in a row, capped): it gets no requests
until the cooldown ends, then one probe at a time until a request succeeds there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping

GENERATE, SCORE = "generate", "score"

log = logging.getLogger(__name__)


class FleetDown(RuntimeError):
    """Every server was down while a request waited, and one of them failed its probe again; the
    waiting request counts that as one of its tries (otherwise a dead fleet never fails a stage)."""

    def __init__(self, url: str, cause: str):
        super().__init__(f"{url} is down: {cause}")
        self.url, self.cause = url, cause


class Server:
    """One URL: its requests in flight per kind, its transient failures in a row, and until when it
    is down (None while it is up)."""

    def __init__(self, url: str):
        self.url = url
        self.in_flight = {GENERATE: 0, SCORE: 0}
        self.failures = 0
        self.markings = 0  # times marked down without a success in between: the cooldown doubles
        self.down_since: float | None = None
        self.down_until: float | None = None
        self.probe_out = False  # the one request a server past its cooldown gets

    @property
    def is_up(self) -> bool:
        return self.down_until is None

    def busy(self) -> int:
        return sum(self.in_flight.values())

    def can_take(self, kind: str, limit: int, now: float) -> bool:
        if self.down_until is None:
            return self.in_flight[kind] < limit
        # Past its cooldown a down server gets one probe, and only once its last requests are done.
        return now >= self.down_until and self.busy() == 0


class Fleet:
    """The servers of a pool and their slots; `acquire` a server for a request, `release` it with
    what happened. Thread-safe: every change happens under one Condition, which wakes the waiters."""

    def __init__(
        self,
        urls: Collection[str],
        limits: Mapping[str, int],
        down_after: int = 3,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not urls:
            raise ValueError("a fleet needs at least one server")
        self.servers = [Server(url) for url in urls]
        self.limits = dict(limits)
        self.down_after, self.cooldown_s, self.max_cooldown_s = max(1, down_after), cooldown_s, max_cooldown_s
        self._clock = clock
        self._changed = threading.Condition()
        self._turn = 0  # where the next tie-break starts: servers equally busy are taken in turn
        self._markings = 0  # down-markings over the fleet so far
        self._last_marking = ("", "")  # (url, cause) of the latest

    def acquire(self, kind: str, avoid: Collection[str] = ()) -> Server:
        """A server with a free slot of `kind`, the slot taken; waits while none has one. A server in
        `avoid` (where this request failed) is taken only when no other server is up. Raises
        FleetDown when no server is up and one was marked down again during the wait."""
        limit = self.limits[kind]
        with self._changed:
            markings_seen = self._markings
            while True:
                now = self._clock()
                server = self._choose(kind, limit, avoid, now)
                if server is not None:
                    server.in_flight[kind] += 1
                    server.probe_out = not server.is_up
                    return server
                if self._markings != markings_seen and not any(s.is_up for s in self.servers):
                    raise FleetDown(*self._last_marking)
                self._changed.wait(self._until_next_cooldown_end(now))

    def release(self, server: Server, kind: str, answered: bool | None, cause: str = "") -> None:
        """Give back `server`'s slot. answered: True when the server answered (any status but 429 and
        5xx), False on a transient failure (`cause` says which), None when neither tells its health."""
        with self._changed:
            server.in_flight[kind] -= 1
            was_probe, server.probe_out = server.probe_out, False
            now = self._clock()
            if answered:
                if not server.is_up:
                    log.info(
                        "server %s is back up after %.1f s down; it takes requests again",
                        server.url,
                        now - server.down_since,
                    )
                server.failures, server.markings, server.down_since, server.down_until = 0, 0, None, None
            elif answered is False:
                if was_probe:
                    self._mark_down(server, now, cause, "its probe failed")
                elif server.is_up:  # a request sent before the server was marked down tells nothing new
                    server.failures += 1
                    if server.failures >= self.down_after:
                        self._mark_down(server, now, cause, f"{server.failures} failures in a row")
            self._changed.notify_all()

    def only_failed_servers_up(self, failed: Collection[str]) -> bool:
        """Whether some server is up but every one that is has failed this request (the retry then
        pauses before going back to one of them)."""
        with self._changed:
            up = [s.url for s in self.servers if s.is_up]
            return bool(up) and all(url in failed for url in up)

    def down_urls(self) -> list[str]:
        with self._changed:
            return [s.url for s in self.servers if not s.is_up]

    def _choose(self, kind: str, limit: int, avoid: Collection[str], now: float) -> Server | None:
        n = len(self.servers)
        order = [self.servers[(self._turn + i) % n] for i in range(n)]
        if any(s.is_up and s.url not in avoid for s in order):
            order = [s for s in order if s.url not in avoid]
        free = [s for s in order if s.can_take(kind, limit, now)]
        if not free:
            return None
        chosen = min(free, key=Server.busy)  # the first of the least busy: ties go in turn
        self._turn = (self.servers.index(chosen) + 1) % n
        return chosen

    def _mark_down(self, server: Server, now: float, cause: str, why: str) -> None:
        cooldown = min(self.cooldown_s * 2**server.markings, self.max_cooldown_s)
        first = server.is_up
        server.markings += 1
        server.failures = 0
        server.down_since = now if first else server.down_since
        server.down_until = now + cooldown
        self._markings += 1
        self._last_marking = (server.url, cause)
        log.warning(
            "server %s %s (%s; the last: %s); no requests to it for %.1f s, then one probe",
            server.url,
            "marked down" if first else "still down",
            why,
            cause,
            cooldown,
        )

    def _until_next_cooldown_end(self, now: float) -> float | None:
        ends = [s.down_until for s in self.servers if s.down_until is not None and s.down_until > now]
        return max(min(ends) - now, 0.001) if ends else None
