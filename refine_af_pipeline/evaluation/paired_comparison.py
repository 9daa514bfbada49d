"""Paired comparison of two models on the same items: mean difference with a bootstrap confidence
interval, and the share of items each side wins.

The unit is the item (an instruction), not the sample: several samples per instruction are averaged
first, so the interval reflects how much the result would move with other instructions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

# Identical instances score the same up to float noise from batch padding (measured ~1e-5 on a
# standardised reward, whose unit is one base-model standard deviation); below this it is a tie.
DEFAULT_TIE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PairedComparison:
    n: int
    mean_difference: float  # mean over items of (candidate - reference)
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    wins: int  # items where the candidate scores higher (by more than the tie tolerance)
    ties: int
    losses: int

    @property
    def win_share(self) -> float:
        return self.wins / self.n

    @property
    def tie_share(self) -> float:
        return self.ties / self.n

    @property
    def loss_share(self) -> float:
        return self.losses / self.n

    def as_dict(self) -> dict:
        return {**asdict(self), "win_share": self.win_share, "tie_share": self.tie_share, "loss_share": self.loss_share}


def outcome(difference: float, tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> str:
    if abs(difference) <= tie_tolerance:
        return "tie"
    return "win" if difference > 0 else "loss"


def paired_bootstrap(
    candidate: Sequence[float],
    reference: Sequence[float],
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
) -> PairedComparison:
    """Percentile bootstrap over items of the mean of candidate[i] - reference[i].

    Fixed seed, so the same scores give the same interval in every run."""
    import numpy as np

    if len(candidate) != len(reference):
        raise ValueError(f"paired scores need equal lengths, got {len(candidate)} and {len(reference)}")
    if not candidate:
        raise ValueError("no paired scores to compare (empty input)")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    diff = np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float)
    if not np.isfinite(diff).all():
        raise ValueError("paired scores contain NaN or infinite values")
    rng = np.random.default_rng(seed)
    n = diff.size
    means = np.empty(resamples)
    # Blocks bound the index matrix (resamples x n) for large n.
    block = max(1, 2_000_000 // n)
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    outcomes = [outcome(float(d), tie_tolerance) for d in diff]
    return PairedComparison(
        n=n,
        mean_difference=float(diff.mean()),
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        resamples=resamples,
        wins=outcomes.count("win"),
        ties=outcomes.count("tie"),
        losses=outcomes.count("loss"),
    )


def mean_paired_difference(candidate: Sequence[float | None], reference: Sequence[float | None]) -> tuple[float, int]:
    """Mean of candidate - reference over the pairs where both have a value (a gated instance has
    no component scores), and how many pairs that was; NaN when none."""
    pairs = [
        (c, r)
        for c, r in zip(candidate, reference, strict=True)
        if c is not None and r is not None and not math.isnan(c) and not math.isnan(r)
    ]
    if not pairs:
        return math.nan, 0
    return sum(c - r for c, r in pairs) / len(pairs), len(pairs)
