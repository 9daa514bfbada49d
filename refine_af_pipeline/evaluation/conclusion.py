"""The rule every asset check that states a conclusion on a comparison follows: it passes only when
the low end of the effect's confidence interval lies above the no-effect line (0 for a paired
difference); otherwise it warns and says why, with the effect, its CI and n.

- pass: the CI's low end is above 0 (and there are at least `min_n` paired items);
- "cannot tell": the CI reaches 0 or below while its high end is above 0, or too few items;
- "no": the whole CI lies at or below 0 (the candidate scored lower).

The verdict asset (evaluation/verdict.py) answers the same questions with a margin of what would
matter; a check has no margin, its line is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NO_EFFECT = 0.0


@dataclass(frozen=True)
class Conclusion:
    passed: bool
    answer: str  # "yes", "cannot tell" or "no"
    description: str  # one sentence: the answer, the effect, its CI and n

    def metadata(self) -> dict:
        return {"answer": self.answer, "conclusion": self.description, "rule": RULE}


RULE = "passes only when the low end of the effect's confidence interval is above 0 (no effect); warns otherwise"


def ci_conclusion(
    claim: str,
    effect: float,
    ci_low: float,
    ci_high: float,
    n: int,
    unit: str = "",
    min_n: int = 0,
    confidence: float = 0.95,
    n_unit: str = "items",
) -> Conclusion:
    """Whether the comparison supports `claim` (e.g. "REFINE-AF beats Self-Instruct by ROUGE-L"):
    `effect` is the mean paired difference (candidate - reference), [ci_low, ci_high] its CI over
    `n` paired items."""
    figures = (
        f"effect {_signed(effect)}{' ' + unit if unit else ''}, "
        f"{confidence:.0%} CI [{_signed(ci_low)}, {_signed(ci_high)}], n = {n} {n_unit}"
    )
    finite = all(math.isfinite(v) for v in (effect, ci_low, ci_high))
    if finite and ci_low > NO_EFFECT and n >= min_n:
        return Conclusion(True, "yes", f"{claim}: yes, the CI lies above 0 ({figures})")
    if finite and ci_high <= NO_EFFECT and n >= min_n:
        return Conclusion(False, "no", f"{claim}: no, the CI lies at or below 0 ({figures})")
    if not finite:
        why = "the effect or its CI is not a number"
    elif n < min_n:
        why = f"fewer than {min_n} {n_unit}"
    else:
        why = "the CI includes 0"
    return Conclusion(False, "cannot tell", f"{claim}: cannot tell, {why} ({figures})")


def _signed(value: float) -> str:
    return f"{value:+.4f}" if math.isfinite(value) else str(value)


def paired_conclusion(claim: str, comparison, unit: str, min_n: int = 0, n_unit: str = "items") -> Conclusion:
    """ci_conclusion of a paired comparison (anything with mean_difference, ci_low, ci_high, n and
    confidence, e.g. paired_comparison.PairedComparison)."""
    return ci_conclusion(
        claim,
        comparison.mean_difference,
        comparison.ci_low,
        comparison.ci_high,
        comparison.n,
        unit=unit,
        min_n=min_n,
        confidence=comparison.confidence,
        n_unit=n_unit,
    )
