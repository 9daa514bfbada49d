"""Instance generation: a model writes input/output pairs for instructions; each is parsed,
gated, scored, and filtered the Self-Instruct way."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from ..feedback.scores import COMPONENTS, PASSING_MARGIN, ComponentStats, FeedbackScorer, combine
from ..llm.backend import SamplingParams, ServedModel, render_prompt
from ..llm.prompts import INSTANCE_PREFIX, instance_prompt
from ..settings_types import NonNegativeInt, PositiveInt, SamplingSettings, Share


def generate_scored_instances(
    model: ServedModel,
    scorer: FeedbackScorer,
    instructions: Sequence[str],
    params: SamplingParams,
    batch_size: int,
    seed: int,
    progress=None,
    is_classification: Sequence[bool] | None = None,
) -> list[dict]:
    """One scored row per instruction: the generation, the parsed instance, the gate's reason (the
    label gate applies where `is_classification`), each component and the reward."""
    prompts = [render_prompt(model.tokenizer, instance_prompt(i), INSTANCE_PREFIX) for i in instructions]
    with model.for_generation() as policy:
        generations = policy.generate(prompts, params, batch_size, seed, progress)
    scored = scorer.score_texts(
        list(instructions),
        [INSTANCE_PREFIX + g.text for g in generations],
        [g.hit_token_limit for g in generations],
        is_classification,
    )
    rows = []
    for instruction, gen, s in zip(instructions, generations, scored):
        rows.append(
            dict(
                instruction=instruction,
                generation=INSTANCE_PREFIX + gen.text,
                generation_tokens=gen.n_tokens,
                hit_token_limit=gen.hit_token_limit,
                input=s.input,
                output=s.output,
                parse_status=s.parse_status,
                gate_reason=s.gate_reason,
                **s.components,
                reward=s.reward,
            )
        )
    return rows


def restandardise(rows: list[dict], weights, bias: float, gate_reward: float) -> ComponentStats:
    """Compute component stats from these rows (the base model's) and recombine their rewards
    (floored above the gate's reward, as FeedbackScorer does)."""
    stats = ComponentStats.from_rows([r for r in rows if r["gate_reason"] is None])
    for r in rows:
        if r["gate_reason"] is None:
            r["reward"] = max(
                combine({c: r[c] for c in COMPONENTS}, stats, weights, bias), gate_reward + PASSING_MARGIN
            )
    return stats


def filter_reason(rows: list[dict]) -> list[str | None]:
    """Why each instance is dropped: the instance gate's reason, or the same input answered with
    different outputs for one instruction (both are dropped: which one is right is unknown)."""
    outputs_by_input: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["gate_reason"] is None:
            outputs_by_input[(r["instruction"], " ".join(r["input"].split()).lower())].add(
                " ".join(r["output"].split()).lower()
            )
    reasons = []
    for r in rows:
        if r["gate_reason"] is not None:
            reasons.append(r["gate_reason"])
        elif len(outputs_by_input[(r["instruction"], " ".join(r["input"].split()).lower())]) > 1:
            reasons.append("conflicting_outputs_for_same_input")
        else:
            reasons.append(None)
    return reasons


class RewardScoresSettings(SamplingSettings):
    """Settings of `reward_scores`: the base model's instances whose component scores standardise
    every later reward."""

    max_instructions: NonNegativeInt = Field(
        0,
        description=(
            "kept instructions to write an instance for (0 = all); a few dozen already fix each component's "
            "mean and spread"
        ),
    )


class InstancePairsSettings(SamplingSettings):
    """Settings of the instance stages (`instance_output_pairs`, `selfinstruct_instance_pairs`,
    `bestofn_instance_pairs`: each reads its own copy; keep them equal for a fair comparison)."""

    max_instructions: NonNegativeInt = Field(
        0,
        description=(
            "kept instructions to write instances for (0 = all, the method); the same seed picks the same ones in "
            "every branch"
        ),
    )
    instances_per_instruction: PositiveInt = Field(2, description="instances written per instruction")
    replicates: PositiveInt = Field(
        1,
        description=(
            "independent draws of the whole instance set (each its own sampling seeds), each fine-tuned apart: the "
            "spread between them is in every comparison's CI"
        ),
    )


class BestOfNSettings(InstancePairsSettings):
    """Settings of `bestofn_instance_pairs`: InstancePairsSettings and the number of candidates."""

    candidates_per_instance: PositiveInt = Field(
        4,
        description=(
            "candidates the base model writes per instance; the one with the highest training reward is kept. The RL "
            "arm's generations are its rollouts (max_steps x prompts_per_step x group_size) plus one per instance: "
            "choose N so that N x instances is about that, for a comparison at equal budget"
        ),
    )


def choose_best(rows: Sequence[dict]) -> list[bool]:
    """Per row, whether it is its instance's chosen candidate: among the rows sharing its
    instance_id, a candidate that passed the gate before any that did not, then the highest reward
    (the first on a tie). Rows without candidates are all chosen."""

    def rank(r: dict) -> tuple[bool, float]:
        return r.get("gate_reason") is None, r["reward"]

    best: dict[str, int] = {}
    for k, r in enumerate(rows):
        j = best.get(r["instance_id"])
        if j is None or rank(r) > rank(rows[j]):
            best[r["instance_id"]] = k
    chosen = set(best.values())
    return [k in chosen for k in range(len(rows))]


def choose_and_filter(rows: Sequence[dict]) -> tuple[list[bool], list[str | None]]:
    """(chosen, filter reason) per row: each instance's best candidate (choose_best), then the
    filters over the chosen rows of each replicate apart (a conflict needs two outputs of one
    draw); a candidate that was not chosen has the reason not_best_of_n."""
    chosen = choose_best(rows)
    reasons: list[str | None] = ["not_best_of_n"] * len(rows)
    for replicate in sorted({r.get("replicate") or 0 for r in rows}):
        picked = [k for k, (r, c) in enumerate(zip(rows, chosen)) if c and (r.get("replicate") or 0) == replicate]
        for k, reason in zip(picked, filter_reason([rows[k] for k in picked])):
            reasons[k] = reason
    return chosen, reasons


class ParseRateSettings(BaseModel):
    """Settings of the parse-rate check on the policy's instances."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_parse_rate: Share = Field(
        0.5, description="warn below this share of instances that parse into input and output"
    )
