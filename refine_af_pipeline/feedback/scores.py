"""Automated feedback: per-component scores of an (instruction, input, output) instance and the
combined reward. The same code scores the base model's instances (reward_scores), the RL reward and
the RL policy's instances (instance_output_pairs).

Each component is a pluggable scorer (components.py: the offline defaults;
judges.py: the paper's reward model and UniEval-style evaluators); setup.py builds
them from a name like "reward-model:<id>". Offline defaults (no network, run on a laptop CPU):
- preference: the base LLM as a judge; rating 1..10 read as the probability-weighted mean over the
  rating tokens (not parsed free text), mapped to [0, 1].
- naturalness: exp(mean token log-likelihood) of the output given the request, under the base model.
- coherence: cosine similarity of (instruction + input) and output, all-MiniLM-L6-v2 embeddings.
- understandability: Flesch reading ease (textstat), clipped to [0, 100] and mapped to [0, 1].
- learned_reward: a Bradley-Terry reward on MiniLM embeddings fitted to prefer the human seed
  instances (reward_model.py; the `reward_model` asset fits it): a judge whose weights are not
  the policy's.
The instance gate (gates.py) gives unparseable, empty, cut, looping, copied or off-label instances
a fixed low reward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..instructions.parsing import parse_instance
from .components import (
    EmbeddingCoherence,
    FeedbackComponent,
    LikelihoodNaturalness,
    LLMJudgePreference,
    ReadabilityUnderstandability,
    flesch_score,
)
from .gates import GateSettings, InstanceGate

__all__ = [
    "COMPONENTS",
    "DEFAULT_WEIGHTS",
    "PASSING_MARGIN",
    "ComponentStats",
    "FeedbackScorer",
    "ScoredInstance",
    "combine",
    "flesch_score",
]

COMPONENTS = ("preference", "naturalness", "coherence", "understandability", "learned_reward")

# Preference and the learned reward carry most weight: they judge whether the output does the
# task, one with the base model's own weights, one with weights fitted to human instances (so the
# policy is not judged only by the weights it starts from). Naturalness and coherence guard
# fluency and topicality; readability is a weak signal that long, simple outputs could game, so
# it weighs least. The weights act on standardised
# components, so they compare like with like (one standard deviation of each over the base
# model's instances); calibration.py can fit them to human ratings instead.
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "preference": 1.0,
    "naturalness": 0.5,
    "coherence": 0.5,
    "understandability": 0.25,
    "learned_reward": 1.0,
}
# The least a gate-passing instance earns above the gate's reward.
PASSING_MARGIN = 0.1


@dataclass(frozen=True)
class ScoredInstance:
    input: str
    output: str
    parse_status: str
    gate_reason: str | None
    components: dict[str, float | None]
    reward: float


@dataclass
class ComponentStats:
    """Mean and standard deviation of each component over the base model's instances.

    `weights`/`bias`, when set, were fitted to human ratings on exactly this standardisation
    (calibration.py) and replace the configured ones: such weights mean nothing on other stats.
    """

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] | None = None
    bias: float | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, float | None]]) -> ComponentStats:
        stats = cls()
        for name in COMPONENTS:
            values = [r[name] for r in rows if r.get(name) is not None and not math.isnan(r[name])]
            if not values:
                stats.mean[name], stats.std[name] = 0.0, 1.0
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
            stats.mean[name] = mean
            # A constant component would divide by zero; treat its spread as 1 (it adds nothing).
            stats.std[name] = math.sqrt(var) if var > 1e-12 else 1.0
        return stats


def standardise(components: Mapping[str, float], stats: ComponentStats) -> dict[str, float]:
    """(x_i - mean_i) / std_i for each component: what the weights multiply."""
    return {name: (value - stats.mean.get(name, 0.0)) / stats.std.get(name, 1.0) for name, value in components.items()}


def combine(
    components: Mapping[str, float], stats: ComponentStats, weights: Mapping[str, float], bias: float = 0.0
) -> float:
    """bias + sum_i w_i * (x_i - mean_i) / std_i."""
    z = standardise({name: components[name] for name in weights}, stats)
    return bias + sum(weight * z[name] for name, weight in weights.items())


class FeedbackScorer:
    """One scorer per component, the standardisation and the weights; scores instances in batches.

    Either pass `components` (one per name in COMPONENTS), or the base model as a judge (a
    ServedModel) and a sentence embedder for the offline defaults.
    """

    def __init__(
        self,
        judge=None,
        embedder=None,
        weights: Mapping[str, float] | None = None,
        stats: ComponentStats | None = None,
        bias: float = 0.0,
        batch_size: int = 8,
        components: Sequence[FeedbackComponent] | None = None,
        gate: InstanceGate | None = None,
        learned_reward: FeedbackComponent | None = None,
    ):
        if components is None:
            if judge is None or embedder is None or learned_reward is None:
                raise ValueError(
                    "FeedbackScorer needs either components or a judge model, an embedder and a learned reward"
                )
            components = [
                LLMJudgePreference(judge, batch_size=batch_size),
                LikelihoodNaturalness(judge, batch_size=batch_size),
                EmbeddingCoherence(embedder, type(embedder).__name__),
                ReadabilityUnderstandability(),
                learned_reward,
            ]
        names = [c.name for c in components]
        if sorted(names) != sorted(COMPONENTS):
            raise ValueError(f"need exactly one scorer for each of {list(COMPONENTS)}, got {names}")
        self.scorers: dict[str, FeedbackComponent] = {c.name: c for c in components}
        self.stats = stats or ComponentStats()
        calibrated = self.stats.weights is not None
        self.weights = dict(self.stats.weights if calibrated else (weights or DEFAULT_WEIGHTS))
        self.bias = float(self.stats.bias or 0.0) if calibrated else bias
        unknown = set(self.weights) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown feedback components in weights: {sorted(unknown)}")
        self.batch_size = batch_size
        self.gate = gate or InstanceGate(GateSettings())

    def versions(self) -> dict[str, str]:
        """Which judge produced each component's numbers (recorded with every scored row)."""
        return {name: self.scorers[name].version for name in COMPONENTS}

    def components(
        self, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]
    ) -> list[dict[str, float]]:
        """Raw component scores for instances that passed the instance gate."""
        if not instructions:
            return []
        columns = {name: self.scorers[name].score(instructions, inputs, outputs) for name in COMPONENTS}
        return [{name: float(columns[name][k]) for name in COMPONENTS} for k in range(len(instructions))]

    def score_texts(
        self,
        instructions: Sequence[str],
        generations: Sequence[str],
        hit_token_limit: Sequence[bool] | None = None,
        is_classification: Sequence[bool] | None = None,
    ) -> list[ScoredInstance]:
        """Parse each generated text into an instance, gate it, score it, combine the reward.
        `hit_token_limit`: which generations stopped at their token limit; `is_classification`:
        which instructions are classification tasks (their outputs must be a label they name)."""
        parsed = [parse_instance(g) for g in generations]
        cut = [bool(h) and p.output_runs_to_end for h, p in zip(hit_token_limit or [False] * len(parsed), parsed)]
        classification = is_classification or [False] * len(parsed)
        gates = [
            self.gate.reason(p.status, i, p.input, p.output, c, bool(k))
            for p, i, c, k in zip(parsed, instructions, cut, classification, strict=True)
        ]
        passing = [k for k, g in enumerate(gates) if g is None]
        comps = self.components(
            [instructions[k] for k in passing], [parsed[k].input for k in passing], [parsed[k].output for k in passing]
        )
        by_index = dict(zip(passing, comps))
        results = []
        for k, (p, gate) in enumerate(zip(parsed, gates)):
            if gate is not None:
                results.append(
                    ScoredInstance(p.input, p.output, p.status, gate, {c: None for c in COMPONENTS}, self.gate.reward)
                )
                continue
            c = by_index[k]
            # A passing instance always earns more than a gated one, however poorly it scores:
            # otherwise RL could gain by getting gated.
            reward = max(combine(c, self.stats, self.weights, self.bias), self.gate.reward + PASSING_MARGIN)
            results.append(ScoredInstance(p.input, p.output, p.status, None, c, reward))
        return results
