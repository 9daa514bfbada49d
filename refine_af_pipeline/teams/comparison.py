"""teams_policy_comparison: chains on held-out seed tasks from three choosers with the same
per-chain random draws, decoding and frozen reviewer: the learned policy (sampled), uniform-random
operations (WizardLM's choice) and the single operation with the best training reward; the paired
bootstrap CI of the per-seed mean reward, and the headroom any choice of operations has."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from ..evaluation.paired_comparison import PairedComparison, paired_bootstrap
from .evolution import Chooser, fixed_chooser, policy_chooser, uniform_chooser
from .headroom import Headroom, headroom


def best_fixed_operation(transitions: pl.DataFrame, operations: Sequence[str]) -> str:
    """The operation with the highest mean reward in the policy's training transitions."""
    means = transitions.filter(pl.col("operation").is_in(operations)).group_by("operation").agg(pl.col("reward").mean())
    return means.sort(["reward", "operation"], descending=[True, False])["operation"][0]


def comparison_arms(
    policy: Callable[[np.ndarray], np.ndarray], operations: Sequence[str], horizon: int, best_fixed: str
) -> dict[str, Chooser]:
    """arm -> chooser: the policy, uniform, and fixed:<the best fixed operation>."""
    return {
        "policy": policy_chooser(policy, len(operations), horizon),
        "uniform": uniform_chooser(len(operations)),
        f"fixed:{best_fixed}": fixed_chooser(list(operations).index(best_fixed)),
    }


@dataclass(frozen=True)
class ArmComparison:
    heldout_seed_tasks: int
    best_fixed: str
    mean_reward: dict[str, list[float]]  # arm -> per-seed mean reward, in seed id order
    vs_uniform: PairedComparison
    vs_fixed: PairedComparison
    room: Headroom

    def figures(self) -> dict:
        """The comparison's figures (the metadata and the check report them)."""
        u, f = self.vs_uniform, self.vs_fixed
        return {
            "heldout_seed_tasks": self.heldout_seed_tasks,
            **{f"mean_reward_{arm.split(':')[0]}": float(np.mean(v)) for arm, v in self.mean_reward.items()},
            "best_fixed_operation": self.best_fixed,
            "policy_minus_uniform": u.mean_difference,
            "policy_minus_uniform_ci95": f"[{u.ci_low:.4f}, {u.ci_high:.4f}]",
            "policy_minus_uniform_ci95_low": u.ci_low,
            "policy_minus_uniform_ci95_high": u.ci_high,
            "policy_vs_uniform_wins_ties_losses": f"{u.wins}/{u.ties}/{u.losses}",
            "policy_minus_fixed": f.mean_difference,
            "policy_minus_fixed_ci95": f"[{f.ci_low:.4f}, {f.ci_high:.4f}]",
        }

    def headroom_figures(self) -> dict:
        room = self.room
        return {
            "headroom_uniform": room.uniform,
            "headroom_best_fixed": room.best_fixed,
            "headroom_best_fixed_operation": room.best_fixed_operation,
            "headroom_best_per_state": room.best_per_state,
            "headroom": room.headroom,
        }


def compare_arms(
    comparison: pl.DataFrame,
    best_fixed: str,
    transitions: pl.DataFrame,
    operations: Sequence[str],
    resamples: int,
    seed: int,
) -> ArmComparison:
    """The paired comparisons of the policy's per-seed mean reward with uniform's and the fixed
    operation's (`comparison`: the comparison's rows), and the headroom of the training transitions."""
    per_seed = comparison.group_by("arm", "seed_id").agg(pl.col("reward").mean()).sort("seed_id")
    arms = comparison["arm"].unique(maintain_order=True).to_list()
    mean_of = {arm: per_seed.filter(pl.col("arm") == arm)["reward"].to_list() for arm in arms}
    fixed = f"fixed:{best_fixed}"
    return ArmComparison(
        heldout_seed_tasks=comparison["seed_id"].n_unique(),
        best_fixed=best_fixed,
        mean_reward=mean_of,
        vs_uniform=paired_bootstrap(mean_of["policy"], mean_of["uniform"], resamples, seed=seed),
        vs_fixed=paired_bootstrap(mean_of["policy"], mean_of[fixed], resamples, seed=seed),
        room=headroom(transitions.select("state", "operation", "reward").to_dicts(), operations),
    )
