"""Settings of the TeaMs-RL assets after the policy (the policy's own: instructor.py)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from ..instructions.rouge import DEFAULT_THRESHOLD
from ..settings_types import GenerationBatchSettings, NonNegativeInt, PositiveInt, Probability, SamplingSettings, Share


class PolicyComparisonSettings(GenerationBatchSettings):
    """Settings of `teams_policy_comparison`: the learned policy against uniform-random operations
    (WizardLM's choice) and the best single fixed operation, on held-out seed tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_seeds: NonNegativeInt = Field(0, description="held-out seed tasks to compare on (0 = all)")
    min_seeds: NonNegativeInt = Field(0, description="the check also needs at least this many held-out seeds")
    bootstrap_resamples: PositiveInt = Field(10_000, description="bootstrap resamples of the paired difference")
    seed: int = Field(0, description="seed of the held-out sample, the chains' action draws and the bootstrap")


class EvolvedInstructionsSettings(GenerationBatchSettings):
    """Settings of `teams_evolved_instructions`: the learned policy's chains on seed tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_seeds: NonNegativeInt = Field(0, description="seed tasks to evolve (0 = all)")
    min_p_differs: Share = Field(
        0.0,
        description=(
            "a rewrite the reviewer gives P(differs) below this is dropped (Evol-Instruct's no-information-gain rule, "
            "beside the reviewer's code rules); 0 keeps every rewrite no rule rejected: the embedded reviewer's P(Yes) "
            "stays between about 0.2 and 0.5 on rewrites that pass the rules, so 0.5 would drop nearly all; raise it "
            "for a stronger reviewer"
        ),
    )
    rouge_threshold: Probability = Field(
        DEFAULT_THRESHOLD,
        description=(
            "ROUGE-L F-measure above which an evolved instruction is a near duplicate of a seed or a kept one"
        ),
    )
    seed: int = Field(0, description="seed of the seed sample and the chains' action draws")


class ExpertAnswerSettings(SamplingSettings):
    """Settings of `teams_instruction_pairs`: the expert model answers the kept evolved instructions."""

    max_new_tokens: PositiveInt = Field(
        256,
        description=(
            "tokens per answer at most: at 128, 58% of the embedded expert's answers were cut (and a cut answer "
            "is gated)"
        ),
    )
    max_instructions: NonNegativeInt = Field(0, description="kept evolved instructions to answer (0 = all)")
