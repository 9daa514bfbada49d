"""What the instructor sees before it chooses an operation.

With only the previous operation as its state, the instructor faces a bandit whose best arm is
barely better than uniform. A choice can depend on more: how far into the chain it is, whether
the last rewrite was rejected (the instruction did not change, so repeating that operation is
likely to fail again), and what the current instruction looks like (already long, already a
question, already holding numbers or constraints). The observation is

    [previous operation one-hot (n) | step / horizon | last rewrite rejected |
     words / 50 (at most 2) | ends with "?" | has a digit | has a constraint word]

all in [0, 2], so the same MLP reads every feature on a similar scale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CONSTRAINT = re.compile(
    r"\b(must|should|exactly|at least|at most|only|without|no more than|include|use)\b", re.IGNORECASE
)
TEXT_FEATURES = ("length", "question", "digit", "constraint")


@dataclass(frozen=True)
class ChainState:
    previous: int | None  # index of the previous operation (None at the start)
    step: int  # operations applied so far
    rejected: bool  # the last rewrite was rejected (the instruction stayed as it was)
    text: str  # the current instruction


def text_features(text: str) -> list[float]:
    words = len(text.split())
    return [
        min(words / 50.0, 2.0),
        float(text.rstrip().endswith("?")),
        float(any(c.isdigit() for c in text)),
        float(CONSTRAINT.search(text) is not None),
    ]


def observation_size(n_operations: int) -> int:
    return n_operations + 2 + len(TEXT_FEATURES)


def encode(state: ChainState, n_operations: int, horizon: int) -> np.ndarray:
    obs = np.zeros(observation_size(n_operations), dtype=np.float32)
    if state.previous is not None:
        obs[state.previous] = 1.0
    obs[n_operations] = state.step / horizon
    obs[n_operations + 1] = float(state.rejected)
    obs[n_operations + 2 :] = text_features(state.text)
    return obs


def state_key(state: ChainState, operations: list[str] | tuple[str, ...]) -> str:
    """A coarse name of the state for tables: previous operation and whether it was rejected."""
    if state.previous is None:
        return "start"
    return f"after {operations[state.previous]}" + (" (rejected)" if state.rejected else "")
