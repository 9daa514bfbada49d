"""Automated feedback: per-component scores of an (instruction, input, output) instance and the
combined reward. The same code scores the base model's instances (reward_scores), the RL reward and
the RL policy's instances (instance_output_pairs).

Offline components (no network, run on a laptop CPU):
- preference: the base LLM as a judge; rating 1..10 read as the probability-weighted mean over the
  rating tokens (not parsed free text), mapped to [0, 1].
- naturalness: exp(mean token log-likelihood) of the output given the request, under the base model.
- coherence: cosine similarity of (instruction + input) and output, all-MiniLM-L6-v2 embeddings.
- understandability: Flesch reading ease (textstat), clipped to [0, 100] and mapped to [0, 1].
A format gate gives unparseable, empty or input-repeating instances a fixed low reward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .generation import continuation_logprobs, next_token_distribution, render_prompt
from .parsing import parse_instance
from .prompts import judge_prompt

COMPONENTS = ("preference", "naturalness", "coherence", "understandability")

# Preference carries most weight: it is the only component that judges whether the output does
# the task. Naturalness and coherence guard fluency and topicality; readability is a weak signal
# that long, simple outputs could game, so it weighs least.
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "preference": 1.0,
    "naturalness": 0.5,
    "coherence": 0.5,
    "understandability": 0.25,
}
FORMAT_GATE_REWARD = -3.0  # well below what standardised components reach for parseable output


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
    """Mean and standard deviation of each component over the base model's instances."""

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

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


def combine(components: Mapping[str, float], stats: ComponentStats, weights: Mapping[str, float], bias: float = 0.0) -> float:
    """bias + sum_i w_i * (x_i - mean_i) / std_i."""
    total = bias
    for name, weight in weights.items():
        total += weight * (components[name] - stats.mean.get(name, 0.0)) / stats.std.get(name, 1.0)
    return total


def format_gate(parse_status: str, input_text: str, output: str) -> str | None:
    if parse_status != "ok":
        return parse_status
    if not output.strip():
        return "empty_output"
    if input_text.strip() and " ".join(output.split()).lower() == " ".join(input_text.split()).lower():
        return "output_equals_input"
    return None


def flesch_score(text: str) -> float:
    import textstat

    return min(max(textstat.flesch_reading_ease(text), 0.0), 100.0) / 100.0


class FeedbackScorer:
    """Holds the judge/base model and the sentence embedder; scores instances in batches."""

    def __init__(self, model, tokenizer, embedder, weights: Mapping[str, float] | None = None,
                 stats: ComponentStats | None = None, bias: float = 0.0, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.weights = dict(weights or DEFAULT_WEIGHTS)
        unknown = set(self.weights) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown feedback components in weights: {sorted(unknown)}")
        self.stats = stats or ComponentStats()
        self.bias = bias
        self.batch_size = batch_size
        self._rating_tokens = self._single_token_ratings()

    def _single_token_ratings(self) -> list[str]:
        ratings = [str(k) for k in range(1, 11)]
        return [r for r in ratings if len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) == 1]

    def components(self, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> list[dict[str, float]]:
        """Raw component scores (each in [0, 1]) for instances that passed the format gate."""
        if not instructions:
            return []
        judge_contexts = [
            render_prompt(self.tokenizer, judge_prompt(i, x, o), assistant_prefix="")
            for i, x, o in zip(instructions, inputs, outputs)
        ]
        dists = next_token_distribution(self.model, self.tokenizer, judge_contexts, self._rating_tokens, self.batch_size)
        values = [int(t) for t in self._rating_tokens]
        lo, hi = min(values), max(values)
        preference = [(sum(p * v for p, v in zip(d, values)) - lo) / (hi - lo) for d in dists]

        requests = [render_prompt(self.tokenizer, f"{i}\n{x}".strip()) for i, x in zip(instructions, inputs)]
        logprobs = continuation_logprobs(self.model, self.tokenizer, requests, list(outputs), self.batch_size)
        naturalness = [math.exp(sum(lp) / len(lp)) if lp else 0.0 for lp in logprobs]

        emb_req = self.embedder.encode([f"{i} {x}".strip() for i, x in zip(instructions, inputs)], normalize_embeddings=True)
        emb_out = self.embedder.encode(list(outputs), normalize_embeddings=True)
        coherence = [float((a * b).sum()) for a, b in zip(emb_req, emb_out)]
        understandability = [flesch_score(o) for o in outputs]
        return [
            dict(preference=p, naturalness=n, coherence=c, understandability=u)
            for p, n, c, u in zip(preference, naturalness, coherence, understandability)
        ]

    def score_texts(self, instructions: Sequence[str], generations: Sequence[str]) -> list[ScoredInstance]:
        """Parse each generated text into an instance, gate it, score it, combine the reward."""
        parsed = [parse_instance(g) for g in generations]
        gates = [format_gate(p.status, p.input, p.output) for p in parsed]
        passing = [k for k, g in enumerate(gates) if g is None]
        comps = self.components(
            [instructions[k] for k in passing], [parsed[k].input for k in passing], [parsed[k].output for k in passing]
        )
        by_index = dict(zip(passing, comps))
        results = []
        for k, (p, gate) in enumerate(zip(parsed, gates)):
            if gate is not None:
                results.append(ScoredInstance(p.input, p.output, p.status, gate, {c: None for c in COMPONENTS}, FORMAT_GATE_REWARD))
                continue
            c = by_index[k]
            results.append(ScoredInstance(p.input, p.output, p.status, None, c, combine(c, self.stats, self.weights, self.bias)))
        return results
