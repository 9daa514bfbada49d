"""A fitted-looking learned reward folder for tests that build the feedback scorer's defaults."""

from pathlib import Path

import numpy as np

from refine_af_pipeline.feedback.reward_model import EmbeddingRewardModel
from refine_af_pipeline.feedback.setup import EMBEDDED_MINILM, embedding_id

MINILM_FEATURES = 2 * 384 + 1  # [u * v, |u - v|, cos] of all-MiniLM-L6-v2 embeddings


def write_learned_reward(folder: Path, weight_on_cosine: float = 1.0) -> Path:
    """A reward model whose score is `weight_on_cosine` x cos(request, output)."""
    weights = np.zeros(MINILM_FEATURES)
    weights[-1] = weight_on_cosine
    return EmbeddingRewardModel(None, weights, embedding_id(EMBEDDED_MINILM), "test").save(Path(folder))
