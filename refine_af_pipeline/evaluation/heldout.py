"""Base model vs RL-refined policy on instructions RL never trained on.

Both models write `samples_per_instruction` instances per instruction with the same prompts, the
same sampling parameters and the same seed per batch (common random numbers: where the two models
assign similar probabilities they draw similar tokens, so the paired difference is less noisy).
The same FeedbackScorer scores both; an instruction's score is the mean over its samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from ..feedback.scores import COMPONENTS, FeedbackScorer
from ..instructions.instances import generate_scored_instances
from ..llm.backend import SamplingParams, ServedModel
from ..settings_types import NonNegativeInt, PositiveInt, SamplingSettings
from ..training.rl_diagnostics import mean_repeat_share
from .paired_comparison import PairedComparison, mean_paired_difference, outcome, paired_bootstrap


@dataclass(frozen=True)
class GainSplit:
    """The mean reward difference (policy - base) split in two exact parts, with bootstrap CIs over
    instructions. With p the share of instances that pass the gate, m the mean reward of those that
    pass and g the gate's fixed reward, the mean reward is p*m + (1-p)*g, and

        difference = (p1 - p0) * (m0 - g)   the gate part: more instances pass, valued at the base's m
                   + p1 * (m1 - m0)         the score part: passing instances score better

    Only the score part can reach a fine-tuned model: every branch drops gated instances before SFT."""

    gate_part: float
    gate_part_ci: tuple[float, float]
    score_part: float
    score_part_ci: tuple[float, float]
    pass_share_base: float
    pass_share_policy: float
    passing_reward_base: float
    passing_reward_policy: float


def gain_split(
    rows: Sequence[dict], gate_reward: float, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> GainSplit:
    """GainSplit of per-instruction rows (per_instruction_rows: samples, *_passed, *_passed_reward_sum)."""
    import numpy as np

    samples = np.array([r["samples"] for r in rows], dtype=float)
    passed = {m: np.array([r[f"{m}_passed"] for r in rows], dtype=float) for m in ("base", "policy")}
    sums = {m: np.array([r[f"{m}_passed_reward_sum"] for r in rows], dtype=float) for m in ("base", "policy")}

    def parts(index):
        total = samples[index].sum()
        p0, p1 = passed["base"][index].sum() / total, passed["policy"][index].sum() / total
        with np.errstate(invalid="ignore", divide="ignore"):
            m0 = sums["base"][index].sum() / passed["base"][index].sum()
            m1 = sums["policy"][index].sum() / passed["policy"][index].sum()
        return (p1 - p0) * (m0 - gate_reward), p1 * (m1 - m0), p0, p1, m0, m1

    everything = np.arange(len(rows))
    gate, score, p0, p1, m0, m1 = parts(everything)
    rng = np.random.default_rng(seed)
    draws = np.array([parts(rng.integers(0, len(rows), len(rows)))[:2] for _ in range(resamples)])
    alpha = (1 - confidence) / 2

    def ci(column):
        values = draws[:, column][np.isfinite(draws[:, column])]
        return tuple(float(q) for q in np.quantile(values, [alpha, 1 - alpha])) if values.size else (math.nan, math.nan)

    return GainSplit(float(gate), ci(0), float(score), ci(1), float(p0), float(p1), float(m0), float(m1))


@dataclass(frozen=True)
class HeldoutSummary:
    comparison: PairedComparison
    mean_reward_base: float
    mean_reward_policy: float
    gate_failure_share_base: float
    gate_failure_share_policy: float
    # The likelihood-based naturalness favours repeated text: a win with rising repeats is suspect.
    repeat_share_base: float
    repeat_share_policy: float
    component_differences: dict[str, float]  # policy - base, over instructions where both have a value
    gain_split: GainSplit


def add_audit(rows: list[dict], audit) -> None:
    """Each row's `audit` score (None where the gate rejected the instance)."""
    passing = [r for r in rows if r["gate_reason"] is None]
    scores = (
        audit.score([r["instruction"] for r in passing], [r["input"] for r in passing], [r["output"] for r in passing])
        if passing
        else []
    )
    for r in rows:
        r["audit"] = None
    for r, s in zip(passing, scores):
        r["audit"] = s


def generate_both(
    base_model: ServedModel,
    policy_model: ServedModel,
    scorer: FeedbackScorer,
    instructions: Sequence[str],
    params: SamplingParams,
    samples_per_instruction: int,
    batch_size: int,
    seed: int,
    progress=None,
    is_classification: Sequence[bool] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Scored instance rows of the base model and of the policy, k consecutive rows per instruction."""
    repeated = [i for i in instructions for _ in range(samples_per_instruction)]
    classification = [
        bool(c) for c in (is_classification or [False] * len(instructions)) for _ in range(samples_per_instruction)
    ]
    results = []
    for label, model in (("base", base_model), ("policy", policy_model)):
        rows = []
        # One seed per batch, so a batch that stops early in one model does not shift the random
        # stream of every later batch.
        for b, start in enumerate(range(0, len(repeated), batch_size)):
            rows += generate_scored_instances(
                model,
                scorer,
                repeated[start : start + batch_size],
                params,
                batch_size,
                seed + b,
                is_classification=classification[start : start + batch_size],
            )
            if progress is not None:
                progress(label, b + 1, -(-len(repeated) // batch_size))
        results.append(rows)
    return results[0], results[1]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def per_instruction_rows(
    instruction_ids: Sequence[str],
    instructions: Sequence[str],
    base_rows: Sequence[dict],
    policy_rows: Sequence[dict],
    samples_per_instruction: int,
) -> list[dict]:
    """One row per instruction: mean reward of each model, difference, outcome, component means,
    gate failures and the first sample of each model (to read what changed)."""
    k = samples_per_instruction
    if len(base_rows) != len(instructions) * k or len(policy_rows) != len(instructions) * k:
        raise ValueError("expected samples_per_instruction scored rows per instruction from each model")
    out = []
    for j, (iid, instruction) in enumerate(zip(instruction_ids, instructions, strict=True)):
        base, policy = base_rows[j * k : (j + 1) * k], policy_rows[j * k : (j + 1) * k]
        base_reward = sum(r["reward"] for r in base) / k
        policy_reward = sum(r["reward"] for r in policy) / k
        row = dict(
            instruction_id=iid,
            instruction=instruction,
            samples=k,
            base_reward=base_reward,
            policy_reward=policy_reward,
            reward_difference=policy_reward - base_reward,
            outcome=outcome(policy_reward - base_reward),
            base_gate_failures=sum(r["gate_reason"] is not None for r in base),
            policy_gate_failures=sum(r["gate_reason"] is not None for r in policy),
            base_passed=sum(r["gate_reason"] is None for r in base),
            policy_passed=sum(r["gate_reason"] is None for r in policy),
            base_passed_reward_sum=sum(r["reward"] for r in base if r["gate_reason"] is None),
            policy_passed_reward_sum=sum(r["reward"] for r in policy if r["gate_reason"] is None),
            base_repeat_share=mean_repeat_share([r["generation"] for r in base]),
            policy_repeat_share=mean_repeat_share([r["generation"] for r in policy]),
        )
        for c in COMPONENTS:
            row[f"base_{c}"] = _mean([r[c] for r in base])
            row[f"policy_{c}"] = _mean([r[c] for r in policy])
        # The audit judge's mean over the samples that passed the gate (None: none passed, or no audit).
        row["base_audit"] = _mean([r.get("audit") for r in base if r["gate_reason"] is None])
        row["policy_audit"] = _mean([r.get("audit") for r in policy if r["gate_reason"] is None])
        row["audit_difference"] = (
            row["policy_audit"] - row["base_audit"]
            if row["base_audit"] is not None and row["policy_audit"] is not None
            else None
        )
        row["base_example"] = base[0]["generation"]
        row["policy_example"] = policy[0]["generation"]
        out.append(row)
    return out


def summarise(
    rows: Sequence[dict], gate_reward: float, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> HeldoutSummary:
    comparison = paired_bootstrap(
        [r["policy_reward"] for r in rows],
        [r["base_reward"] for r in rows],
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )
    samples = sum(r["samples"] for r in rows)
    return HeldoutSummary(
        comparison=comparison,
        mean_reward_base=sum(r["base_reward"] for r in rows) / len(rows),
        mean_reward_policy=sum(r["policy_reward"] for r in rows) / len(rows),
        gate_failure_share_base=sum(r["base_gate_failures"] for r in rows) / samples,
        gate_failure_share_policy=sum(r["policy_gate_failures"] for r in rows) / samples,
        repeat_share_base=sum(r["base_repeat_share"] for r in rows) / len(rows),
        repeat_share_policy=sum(r["policy_repeat_share"] for r in rows) / len(rows),
        component_differences={
            c: mean_paired_difference([r[f"policy_{c}"] for r in rows], [r[f"base_{c}"] for r in rows])[0]
            for c in COMPONENTS
        },
        gain_split=gain_split(rows, gate_reward, resamples, seed, confidence),
    )


class HeldoutCheckSettings(SamplingSettings):
    """Settings of the held-out comparison (`rl_heldout_comparison`); its sampling defaults are the
    instance stages', so it measures the policy as the pipeline uses it."""

    samples_per_instruction: PositiveInt = Field(
        2,
        description=(
            "instances per instruction and model, averaged: more samples, less sampling noise per instruction"
        ),
    )
    max_instructions: NonNegativeInt = Field(0, description="held-out instructions to compare (0 = all)")
    min_instructions: NonNegativeInt = Field(
        5, description="with fewer held-out instructions the check warns: the CI means little"
    )
    bootstrap_resamples: PositiveInt = Field(10_000, description="resamples of the instructions behind the CI")
