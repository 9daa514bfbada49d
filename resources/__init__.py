"""Dagster resources: the DuckDB warehouse, language models (with device), feedback scorer, artifacts."""

from .artifact_store import ArtifactStore
from .feedback_scorer import FeedbackScorerResource
from .language_model import LanguageModelResource
from .warehouse import DatabaseLocked, Warehouse

__all__ = ["ArtifactStore", "DatabaseLocked", "FeedbackScorerResource", "LanguageModelResource", "Warehouse"]
