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
from ..llm.backend import SamplingParams, ServedModel
from ..instructions.instances import generate_scored_instances
from .paired_comparison import PairedComparison, mean_paired_difference, outcome, paired_bootstrap
from ..training.rl_diagnostics import mean_repeat_share
from ..settings_types import NonNegativeInt, PositiveInt, SamplingSettings




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


def generate_both(base_model: ServedModel, policy_model: ServedModel, scorer: FeedbackScorer, instructions: Sequence[str],
                  params: SamplingParams, samples_per_instruction: int, batch_size: int, seed: int,
                  progress=None) -> tuple[list[dict], list[dict]]:
    """Scored instance rows of the base model and of the policy, k consecutive rows per instruction."""
    repeated = [i for i in instructions for _ in range(samples_per_instruction)]
    results = []
    for label, model in (("base", base_model), ("policy", policy_model)):
        rows = []
        # One seed per batch, so a batch that stops early in one model does not shift the random
        # stream of every later batch.
        for b, start in enumerate(range(0, len(repeated), batch_size)):
            rows += generate_scored_instances(model, scorer, repeated[start:start + batch_size], params,
                                              batch_size, seed + b)
            if progress is not None:
                progress(label, b + 1, -(-len(repeated) // batch_size))
        results.append(rows)
    return results[0], results[1]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def per_instruction_rows(instruction_ids: Sequence[str], instructions: Sequence[str], base_rows: Sequence[dict],
                         policy_rows: Sequence[dict], samples_per_instruction: int) -> list[dict]:
    """One row per instruction: mean reward of each model, difference, outcome, component means,
    gate failures and the first sample of each model (to read what changed)."""
    k = samples_per_instruction
    if len(base_rows) != len(instructions) * k or len(policy_rows) != len(instructions) * k:
        raise ValueError("expected samples_per_instruction scored rows per instruction from each model")
    out = []
    for j, (iid, instruction) in enumerate(zip(instruction_ids, instructions, strict=True)):
        base, policy = base_rows[j * k:(j + 1) * k], policy_rows[j * k:(j + 1) * k]
        base_reward = sum(r["reward"] for r in base) / k
        policy_reward = sum(r["reward"] for r in policy) / k
        row = dict(instruction_id=iid, instruction=instruction, samples=k, base_reward=base_reward,
                   policy_reward=policy_reward, reward_difference=policy_reward - base_reward,
                   outcome=outcome(policy_reward - base_reward),
                   base_gate_failures=sum(r["gate_reason"] is not None for r in base),
                   policy_gate_failures=sum(r["gate_reason"] is not None for r in policy),
                   base_repeat_share=mean_repeat_share([r["generation"] for r in base]),
                   policy_repeat_share=mean_repeat_share([r["generation"] for r in policy]))
        for c in COMPONENTS:
            row[f"base_{c}"] = _mean([r[c] for r in base])
            row[f"policy_{c}"] = _mean([r[c] for r in policy])
        row["base_example"] = base[0]["generation"]
        row["policy_example"] = policy[0]["generation"]
        out.append(row)
    return out


def summarise(rows: Sequence[dict], resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> HeldoutSummary:
    comparison = paired_bootstrap([r["policy_reward"] for r in rows], [r["base_reward"] for r in rows],
                                  resamples=resamples, confidence=confidence, seed=seed)
    samples = sum(r["samples"] for r in rows)
    return HeldoutSummary(
        comparison=comparison,
        mean_reward_base=sum(r["base_reward"] for r in rows) / len(rows),
        mean_reward_policy=sum(r["policy_reward"] for r in rows) / len(rows),
        gate_failure_share_base=sum(r["base_gate_failures"] for r in rows) / samples,
        gate_failure_share_policy=sum(r["policy_gate_failures"] for r in rows) / samples,
        repeat_share_base=sum(r["base_repeat_share"] for r in rows) / len(rows),
        repeat_share_policy=sum(r["policy_repeat_share"] for r in rows) / len(rows),
        component_differences={c: mean_paired_difference([r[f"policy_{c}"] for r in rows],
                                                         [r[f"base_{c}"] for r in rows])[0] for c in COMPONENTS},
    )


class HeldoutCheckSettings(SamplingSettings):
    """Settings of the held-out comparison (`rl_heldout_comparison`); its sampling defaults are the
    instance stages', so it measures the policy as the pipeline uses it."""

    samples_per_instruction: PositiveInt = Field(2, description=(
        "instances per instruction and model, averaged: more samples, less sampling noise per instruction"))
    max_instructions: NonNegativeInt = Field(0, description="held-out instructions to compare (0 = all)")
    min_instructions: NonNegativeInt = Field(5, description="with fewer held-out instructions the check warns: the CI means little")
    bootstrap_resamples: PositiveInt = Field(10_000, description="resamples of the instructions behind the CI")
