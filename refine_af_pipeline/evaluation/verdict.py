"""One answer to "did RL help?": each question's effect with a 95% CI over seeds and items, and a
rule that turns it into yes / no / cannot tell.

A difference is measured per (seed, item): a seed is one replicate of the arm (its own instance
generation and SFT, or its own RL run), an item is what the seeds share (an evaluation task, a
held-out instruction, a held-out seed task). Seeds and items are crossed, so the bootstrap
resamples both at once: S seeds with replacement and N items with replacement, the effect being
the mean over the drawn cells. With one seed it is the usual bootstrap over items; with many it
also carries the spread between replicates, which a per-run CI never sees.

The rule, with `margin` the smallest effect that matters for the metric:
- yes: the CI lies above 0;
- no: the CI's upper end is below `margin` (any effect is negative or too small to matter);
- cannot tell: otherwise (the CI spans 0 and reaches effects that would matter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..settings_types import NonNegativeFloat, PositiveInt

RULE = (
    "yes when the 95% CI lies above 0; no when its upper end is below the margin (the smallest effect that "
    "matters); cannot tell otherwise"
)
# Power of the minimum detectable difference: a true effect this large is found (CI above 0) about
# 80% of the time at a two-sided 5% level: (1.96 + 0.84) standard errors.
MDD_Z = 1.96 + 0.84


class VerdictSettings(BaseModel):
    """Settings of `rl_verdict`: the smallest effect that matters per metric, and the bootstrap."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    margin_reward: NonNegativeFloat = Field(
        0.1,
        description=(
            "smallest training-reward difference that matters, in the reward's units (a component's weight times "
            "its standardised value: 0.1 is a tenth of one base-model standard deviation of the preference score)"
        ),
    )
    margin_rouge_l: NonNegativeFloat = Field(0.01, description="smallest ROUGE-L difference that matters (0-1 scale)")
    margin_log_likelihood: NonNegativeFloat = Field(
        0.01, description=("smallest difference of the references' mean log-likelihood that matters (nats per token)")
    )
    margin_audit: NonNegativeFloat = Field(
        0.05,
        description=(
            "smallest difference of the audit judge's pointwise mutual information that matters (nats per token)"
        ),
    )
    margin_teams_reward: NonNegativeFloat = Field(
        0.01, description=("smallest difference of TeaMs-RL's reward per step that matters (a probability)")
    )
    bootstrap_resamples: PositiveInt = Field(10_000, description="resamples of seeds and items behind each CI")
    seed: int = Field(0, description="seed of the bootstrap")


@dataclass(frozen=True)
class VerdictRow:
    question: str
    candidate: str
    reference: str
    metric: str
    judge: str
    effect: float
    ci95_low: float
    ci95_high: float
    n_items: int
    n_seeds: int
    margin: float
    min_detectable_difference: float
    answer: str
    note: str = ""
    per_seed_effects: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "answer_rule": RULE}


def crossed_bootstrap(
    differences: np.ndarray, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """(mean, ci_low, ci_high, standard error) of the mean of a seeds x items table of paired
    differences, resampling seeds and items together. NaN cells (an item a seed lacks) are left out
    of the mean they fall in."""
    table = np.atleast_2d(np.asarray(differences, dtype=float))
    if table.size == 0 or np.isnan(table).all():
        raise ValueError("no paired differences to bootstrap")
    s, n = table.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for k in range(resamples):
        cells = table[np.ix_(rng.integers(0, s, s), rng.integers(0, n, n))]
        means[k] = np.nanmean(cells) if not np.isnan(cells).all() else np.nan
    means = means[np.isfinite(means)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(np.nanmean(table)), float(low), float(high), float(means.std(ddof=1)) if means.size > 1 else math.nan


def answer(ci_low: float, ci_high: float, margin: float) -> str:
    if ci_low > 0:
        return "yes"
    if ci_high < margin:
        return "no"
    return "cannot tell"


def verdict_row(
    question: str,
    candidate: str,
    reference: str,
    metric: str,
    judge: str,
    differences: np.ndarray,
    margin: float,
    resamples: int = 10_000,
    seed: int = 0,
    note: str = "",
) -> VerdictRow:
    """The row for one question from its seeds x items table of (candidate - reference)."""
    table = np.atleast_2d(np.asarray(differences, dtype=float))
    finite = ~np.isnan(table)
    items, seeds = int(finite.any(axis=0).sum()), int(finite.any(axis=1).sum())  # with a difference somewhere
    if not finite.any():
        nan = float("nan")
        return VerdictRow(
            question,
            candidate,
            reference,
            metric,
            judge,
            nan,
            nan,
            nan,
            0,
            0,
            margin,
            nan,
            "cannot tell",
            "; ".join(filter(None, [note, "no item both sides have"])),
        )
    table = table[finite.any(axis=1)][:, finite.any(axis=0)]
    mean, low, high, se = crossed_bootstrap(table, resamples, seed)
    per_seed = " / ".join(f"{v:+.3f}" for v in np.nanmean(table, axis=1))  # every kept seed has a finite cell
    return VerdictRow(
        question,
        candidate,
        reference,
        metric,
        judge,
        mean,
        low,
        high,
        items,
        seeds,
        margin,
        MDD_Z * se,
        answer(low, high, margin),
        note,
        per_seed,
    )


def difference_table(
    rows: Sequence[dict],
    candidate: str,
    reference: str,
    value: str,
    model_key: str = "model",
    item_key: str = "task",
    seed_key: str = "replicate",
) -> np.ndarray:
    """Seeds x items table of candidate - reference from long rows (model, item, seed, value); a
    row without `seed_key` is seed 0. Items are those both models have in a seed (else NaN)."""
    values: dict[tuple, float] = {}
    for r in rows:
        values[(r.get(seed_key) or 0, r[item_key], r[model_key])] = r[value]
    seeds = sorted({k[0] for k in values})
    items = sorted({k[1] for k in values})
    table = np.full((len(seeds), len(items)), np.nan)
    for i, s in enumerate(seeds):
        for j, item in enumerate(items):
            a, b = values.get((s, item, candidate)), values.get((s, item, reference))
            if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
                table[i, j] = a - b
    return table


def verdict_markdown(rows: Sequence[dict]) -> str:
    """The verdict as a markdown table (the UI's metadata, the README's "Did RL help?")."""
    lines = [
        "| question | metric | effect [95% CI] | n x seeds | min. detectable | answer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['question']} (vs {r['reference']}) | {r['metric']} | {r['effect']:+.3f} "
            f"[{r['ci95_low']:+.3f}, {r['ci95_high']:+.3f}] | {r['n_items']} x {r['n_seeds']} | "
            f"{r['min_detectable_difference']:.3f} | **{r['answer']}** |"
        )
    return "\n".join(lines)
