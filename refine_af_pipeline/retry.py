"""Bounded retry with exponential backoff for calls into a model backend.

Generation on a shared machine fails now and then for reasons that go away (a CUDA launch or
out-of-memory error while another process holds the GPU, an I/O error reading a memory-mapped
checkpoint). One failed batch should not cost a run of hours, so such a call is tried again a
few times with growing pauses; an error that persists is raised with the number of tries.
Errors that say the input or the code is wrong (ValueError, TypeError, ...) are never retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("refine_af_pipeline.retry")


class RetriesExhausted(RuntimeError):
    pass


@dataclass(frozen=True)
class Backoff:
    attempts: int = 3  # tries in all, the first included
    first_delay_s: float = 2.0
    factor: float = 2.0
    max_delay_s: float = 30.0
    retry_on: tuple[type[BaseException], ...] = (RuntimeError, OSError)

    def delays(self) -> list[float]:
        """The pauses between tries: first_delay_s, then multiplied by factor, capped."""
        return [min(self.first_delay_s * self.factor ** k, self.max_delay_s) for k in range(self.attempts - 1)]


DEFAULT_BACKOFF = Backoff()


def call_with_retry(fn: Callable[[], T], what: str, backoff: Backoff | None = None,
                    sleep: Callable[[float], None] | None = None) -> T:
    """fn(), tried up to backoff.attempts times (DEFAULT_BACKOFF if None) while it raises one of
    backoff.retry_on."""
    backoff = backoff or DEFAULT_BACKOFF
    sleep = sleep or time.sleep
    delays = backoff.delays()
    for attempt in range(1, backoff.attempts + 1):
        try:
            return fn()
        except backoff.retry_on as exc:
            if attempt == backoff.attempts:
                raise RetriesExhausted(f"{what} failed {attempt} times; the last error: "
                                       f"{type(exc).__name__}: {exc}") from exc
            delay = delays[attempt - 1]
            log.warning("%s failed (try %d of %d: %s: %s); trying again in %.0f s", what, attempt,
                        backoff.attempts, type(exc).__name__, exc, delay)
            _free_accelerator_memory()
            sleep(delay)
    raise AssertionError("unreachable")


def _free_accelerator_memory() -> None:
    # After an out-of-memory error the allocator still caches the failed attempt's blocks.
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let the clean-up hide the real error
        pass
