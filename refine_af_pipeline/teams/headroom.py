"""How much a choice of operations could gain at all, read from the instructor's training
transitions: the mean reward of each operation overall (what a fixed operation gets), and per
state (previous operation, whether it was rejected) the operation with the best mean reward.

    uniform      = the mean over operations of each operation's mean reward
    best fixed   = the best operation's mean reward
    best per state = the state-weighted mean of each state's best operation's mean reward

A learned policy cannot beat `best per state` by much (with this coarse state), so `best per state
- uniform` is the headroom: when it is about as small as the comparison's CI, no policy can show a
gain the comparison can detect. The estimates come from states the behaviour policy visited, each
(state, operation) cell with at least `min_count` transitions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Headroom:
    uniform: float
    best_fixed: float
    best_fixed_operation: str
    best_per_state: float
    per_state: list[dict]  # state, transitions, best operation, its mean reward, mean reward per operation

    @property
    def headroom(self) -> float:
        return self.best_per_state - self.uniform


def headroom(transitions: Sequence[dict], operations: Sequence[str], min_count: int = 3) -> Headroom:
    """`transitions`: rows with state, operation, reward (teams_policy_transitions)."""
    rewards: dict[tuple[str, str], list[float]] = defaultdict(list)
    for t in transitions:
        rewards[(t["state"], t["operation"])].append(float(t["reward"]))
    by_op = {op: [r for (s, o), rs in rewards.items() if o == op for r in rs] for op in operations}
    op_means = {op: sum(v) / len(v) for op, v in by_op.items() if v}
    if not op_means:
        raise ValueError("no transitions to measure the headroom on")
    best_op = max(op_means, key=lambda o: (op_means[o], -list(operations).index(o)))
    states = sorted({s for s, _ in rewards})
    per_state, weighted, total = [], 0.0, 0
    for state in states:
        means = {
            op: sum(rewards[(state, op)]) / len(rewards[(state, op)])
            for op in operations
            if len(rewards[(state, op)]) >= min_count
        }
        n = sum(len(rewards[(state, op)]) for op in operations)
        if not means:
            continue
        best = max(means, key=lambda o: (means[o], -list(operations).index(o)))
        per_state.append(
            dict(
                state=state,
                state_transitions=n,
                best_operation=best,
                best_mean_reward=means[best],
                **{f"mean_reward_{op}": means.get(op) for op in operations},
            )
        )
        weighted += n * means[best]
        total += n
    return Headroom(
        uniform=sum(op_means.values()) / len(op_means),
        best_fixed=op_means[best_op],
        best_fixed_operation=best_op,
        best_per_state=weighted / total if total else float("nan"),
        per_state=per_state,
    )
