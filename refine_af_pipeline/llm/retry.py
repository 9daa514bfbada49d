"""Bounded retry with exponential backoff for calls into a model backend.

Generation on a shared machine fails now and then for reasons that go away (a CUDA launch or
out-of-memory error while another process holds the GPU, an I/O error reading a memory-mapped
checkpoint). One failed batch should not cost a run of hours, so such a call is tried again a
few times with growing pauses; an error that persists is raised with the number of tries.
Only errors of that kind are retried (`is_transient`): running out of accelerator memory, I/O
errors, connection errors and timeouts. Every other error, a RuntimeError from a shape mismatch or
a corrupted CUDA context included, is raised at once: trying again would only repeat it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class RetriesExhausted(RuntimeError):
    pass


@dataclass(frozen=True)
class Backoff:
    attempts: int = 3  # tries in all, the first included
    first_delay_s: float = 2.0
    factor: float = 2.0
    max_delay_s: float = 30.0
    retry_on: Callable[[BaseException], bool] | None = None  # is_transient if None

    def delays(self) -> list[float]:
        """The pauses between tries: first_delay_s, then multiplied by factor, capped."""
        return [min(self.first_delay_s * self.factor**k, self.max_delay_s) for k in range(self.attempts - 1)]


DEFAULT_BACKOFF = Backoff()

# Messages of RuntimeErrors that mean "out of memory" on each accelerator backend (torch raises
# torch.OutOfMemoryError for CUDA, plain RuntimeErrors for cuBLAS allocation failures, ROCm and MPS).
_OUT_OF_MEMORY_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
# OSErrors that say a path or a permission is wrong: the same call fails the same way again.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_PERMANENT_ERRNOS = {
    errno.ENOENT,
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EINVAL,
}


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` may go away on its own: accelerator out-of-memory, an I/O error, a lost
    connection or a timeout."""
    if isinstance(exc, RetriesExhausted):  # already retried inside: a second loop would square the tries
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _PERMANENT_OS_ERRORS) and exc.errno not in _PERMANENT_ERRNOS
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OUT_OF_MEMORY_MARKERS)


def call_with_retry(
    fn: Callable[[], T], what: str, backoff: Backoff | None = None, sleep: Callable[[float], None] | None = None
) -> T:
    """fn(), tried up to backoff.attempts times (DEFAULT_BACKOFF if None) while it raises an error
    that backoff.retry_on (is_transient by default) calls transient; any other error at once."""
    backoff = backoff or DEFAULT_BACKOFF
    sleep = sleep or time.sleep
    transient = backoff.retry_on or is_transient
    delays = backoff.delays()
    for attempt in range(1, backoff.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            if attempt == backoff.attempts:
                raise RetriesExhausted(
                    f"{what} failed {attempt} times; the last error: {type(exc).__name__}: {exc}"
                ) from exc
            delay = delays[attempt - 1]
            log.warning(
                "%s failed (try %d of %d: %s: %s); trying again in %.0f s",
                what,
                attempt,
                backoff.attempts,
                type(exc).__name__,
                exc,
                delay,
            )
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
