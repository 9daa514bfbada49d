"""How two models compare over evaluation tasks: the paper's figure (the share of tasks where the
REFINE-AF model scores higher than the Self-Instruct model) with a bootstrap confidence interval.

The unit is the task: per-instance scores (ROUGE-L, log-likelihood) are averaged within a task
first, as SuperNI reports it, so the interval says how much the share would move with another
draw of tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from .paired_comparison import paired_bootstrap

# Greedy decoding gives identical outputs (hence identical task means) when both models answer alike;
# anything closer than this is that case, not an improvement.
ROUGE_TIE_TOLERANCE = 1e-9
# A task's mean log-likelihood (nats per token) moves by less than this only through float noise of
# batching; any real change of the model moves it by more.
LOG_LIKELIHOOD_TIE_TOLERANCE = 1e-4
METRIC_TIE_TOLERANCES = {"rouge_l": ROUGE_TIE_TOLERANCE, "log_likelihood": LOG_LIKELIHOOD_TIE_TOLERANCE}


@dataclass(frozen=True)
class TaskComparison:
    candidate: str
    reference: str
    n_tasks: int
    wins: int  # tasks where the candidate's task mean is higher
    ties: int
    losses: int
    win_share: float  # wins / n_tasks: ties count as "not improved", as in the paper's share
    win_share_ci_low: float
    win_share_ci_high: float
    mean_difference: float  # mean over tasks of candidate - reference task means
    mean_difference_ci_low: float
    mean_difference_ci_high: float
    confidence: float
    resamples: int

    @property
    def tie_share(self) -> float:
        return self.ties / self.n_tasks

    @property
    def loss_share(self) -> float:
        return self.losses / self.n_tasks

    def as_dict(self) -> dict:
        return {**asdict(self), "tie_share": self.tie_share, "loss_share": self.loss_share}


def compare_over_tasks(
    candidate: Mapping[str, float],
    reference: Mapping[str, float],
    candidate_name: str = "candidate",
    reference_name: str = "reference",
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    tie_tolerance: float = ROUGE_TIE_TOLERANCE,
) -> TaskComparison:
    """Paired over the tasks both models were scored on (task name -> task mean of one metric); both must hold
    the same tasks. Percentile bootstrap over tasks, fixed seed: the same scores give the same CI."""
    import numpy as np

    if set(candidate) != set(reference):
        missing = sorted(set(candidate) ^ set(reference))
        raise ValueError(f"{candidate_name} and {reference_name} were scored on different tasks: {missing[:5]}")
    tasks = sorted(candidate)
    cand = [float(candidate[t]) for t in tasks]
    ref = [float(reference[t]) for t in tasks]
    paired = paired_bootstrap(cand, ref, resamples, confidence, seed, tie_tolerance)
    won = (np.asarray(cand) - np.asarray(ref)) > tie_tolerance
    rng = np.random.default_rng(seed)
    shares = won[rng.integers(0, won.size, size=(resamples, won.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(shares, [alpha, 1 - alpha])
    return TaskComparison(
        candidate=candidate_name,
        reference=reference_name,
        n_tasks=paired.n,
        wins=paired.wins,
        ties=paired.ties,
        losses=paired.losses,
        win_share=paired.win_share,
        win_share_ci_low=float(low),
        win_share_ci_high=float(high),
        mean_difference=paired.mean_difference,
        mean_difference_ci_low=paired.ci_low,
        mean_difference_ci_high=paired.ci_high,
        confidence=confidence,
        resamples=resamples,
    )


def mean_per_model(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """model -> mean over its tasks of the per-task means (every task weighs the same)."""
    return {model: sum(by_task.values()) / len(by_task) for model, by_task in scores.items() if by_task}


def summary_rows(
    by_metric: Mapping[str, Mapping[str, Mapping[str, float]]],
    pairs: Sequence[tuple[str, str]],
    resamples: int = 10_000,
    seed: int = 0,
) -> list[dict]:
    """One row per (metric, candidate, reference): compare_over_tasks with the metric's tie
    tolerance. `by_metric`: metric -> model -> task -> task mean."""
    rows = []
    for metric, by_model in by_metric.items():
        for candidate, reference in pairs:
            c = compare_over_tasks(
                by_model[candidate],
                by_model[reference],
                candidate,
                reference,
                resamples,
                seed=seed,
                tie_tolerance=METRIC_TIE_TOLERANCES[metric],
            )
            rows.append({"metric": metric, **c.as_dict()})
    return rows


def tasks_differing(candidate: Mapping[str, float], reference: Mapping[str, float], margin: float) -> int:
    """How many tasks' means differ by more than `margin` (either way)."""
    return sum(abs(candidate[t] - reference[t]) > margin for t in candidate)
