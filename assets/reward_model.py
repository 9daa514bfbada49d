"""Stage 2a: the learned reward component, fitted to prefer the human seed instances."""

import time

import dagster as dg
import numpy as np
import polars as pl

from refine_af_pipeline.feedback.audit import InstructionPMIAudit
from refine_af_pipeline.feedback.components import LLMJudgePreference
from refine_af_pipeline.feedback.reward_model import (
    KINDS,
    EmbeddingRewardModel,
    RewardModelSettings,
    features,
    fit_bradley_terry,
    length_baseline,
    pairwise_accuracy,
    preference_pairs,
)
from refine_af_pipeline.feedback.setup import embedding_id, load_embedder
from refine_af_pipeline.instructions.parsing import parse_instance
from refine_af_pipeline.llm.backend import render_prompt
from refine_af_pipeline.llm.prompts import INSTANCE_PREFIX, instance_prompt
from refine_af_pipeline.llm.query_count import QueryCounter
from refine_af_pipeline.training.splits import sample_rows, stable_split
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse

from . import groups
from .columns import declare
from .metadata import metadata_table, peak_memory, progress_logger, table_metadata
from .seed_pool import SEED_POOL

SPLIT_SALT = "reward-model"
REWARD_MODEL = "reward_model"
_NEGATIVE_KIND = (
    "what the human output is preferred over: base_model (its answer), echo (the input or instruction), "
    "other_task (another seed task's output), cut (the output's first half)"
)
COLUMNS = declare(
    {
        REWARD_MODEL: {
            "instruction_id": "id of the seed task the pair comes from",
            "negative_kind": _NEGATIVE_KIND,
            "slice": "train (the reward model was fitted on it) or heldout (a stable hash of the seed task)",
            "input": "the seed task's first input",
            "preferred": "the preferred output (the human-written one)",
            "rejected": "the output it is preferred over",
            "preferred_reward": "learned reward of the preferred output",
            "rejected_reward": "learned reward of the rejected output",
            "correct": "the learned reward ranks the preferred output strictly higher",
            "length_correct": "the length-only baseline ranks the preferred output strictly higher",
            "self_rating_correct": "the base model's 1-10 self-rating ranks the preferred output strictly higher "
            "(held-out pairs only)",
            "audit_correct": "the audit judge ranks the preferred output strictly higher (held-out pairs only; "
            "null: an empty output)",
            "model_dir": "folder of the fitted reward model in the artifact store",
            "reward_model_version": "the learned reward's method, embedder and fitting run",
            "model_id": "base model that wrote the base_model negatives and the self-ratings",
        },
        f"{REWARD_MODEL}/accuracy_by_kind": {
            "negative_kind": _NEGATIVE_KIND + "; all: every kind",
            "heldout_pairs": "held-out preference pairs of the kind",
            "learned_reward": "pairwise accuracy of the learned reward on those pairs (0-1)",
            "length_baseline": "pairwise accuracy of the length-only baseline on those pairs (0-1)",
            "self_rating": "pairwise accuracy of the base model's 1-10 self-rating on those pairs (0-1)",
            "audit_judge": "pairwise accuracy of the audit judge on those pairs (0-1; a missing score counts as a "
            "wrong order, a tie as one half)",
        },
    }
)


class RewardModelConfig(dg.Config, RewardModelSettings):
    """Run config of `reward_model`: the fields of RewardModelSettings (refine_af_pipeline/feedback/reward_model.py)."""


@dg.asset(group_name=groups.SHARED_POOL, kinds={"duckdb", "pytorch"}, deps=[SEED_POOL], pool="gpu")
def reward_model(
    context: dg.AssetExecutionContext,
    config: RewardModelConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    feedback_scorer: FeedbackScorerResource,
    audit_model: LanguageModelResource,
    artifact_store: ArtifactStore,
) -> dg.MaterializeResult:
    """A Bradley-Terry reward on frozen sentence embeddings, fitted on the seed tasks to prefer the
    human-written instance over the base model's instance for the same instruction, over the input
    echoed, over another task's output and over the output cut in half. One row per preference
    pair (train or held out by a hash of the seed task), with both outputs' learned rewards; on the
    held-out pairs also a length-only baseline and the base model's 1-10 self-rating (the
    preference component) and the audit judge (audit.py), so the metadata says which orders the
    pairs best: the audit judge is validated here on pairs whose answer is known. The fitted weights go
    to the artifact store (`model_dir`); the learned_reward component of every later reward loads them."""
    tasks = _seed_tasks(warehouse, config)
    queries = QueryCounter()
    base = queries.wrap(language_model.open_models({"base": None})["base"], "generator", scoring_role="judge")
    # Opened before the generation, so a backend that cannot score fails the step at once.
    audit = InstructionPMIAudit(
        queries.wrap(audit_model.open_models({"audit": None})["audit"], "audit"), audit_model.scoring_batch_size
    )
    base_outputs = _base_outputs(context, config, language_model, base, tasks)
    pairs = preference_pairs(tasks, base_outputs, config.seed)
    heldout_ids = stable_split([p.instruction_id for p in pairs], config.heldout_share, SPLIT_SALT).held
    held = [p.instruction_id in heldout_ids for p in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    device = language_model.resolved_device()
    embedder = load_embedder(feedback_scorer.embedding_model, device, feedback_scorer.allow_download)
    weights, model_dir, fitted = _fit(context, config, feedback_scorer, artifact_store, embedder, train)
    preferred, rejected = _rewards(embedder, pairs, weights)
    sign = length_baseline(train)
    tested = [k for k, h in enumerate(held) if h]
    # The base model's self-rating (the preference component) on the held-out pairs, for comparison.
    self_rating = _heldout_scores(LLMJudgePreference(base, language_model.scoring_batch_size), pairs, tested)
    audit_scores = _heldout_scores(audit, pairs, tested)
    rows = _pair_rows(pairs, held, preferred, rejected, sign, self_rating, audit_scores)
    df = _pairs_table(context, rows, model_dir, fitted, base, queries)
    warehouse.write_table(REWARD_MODEL, df)
    accuracy = _heldout_accuracy(df, pairs, preferred, rejected, sign, self_rating, audit_scores, tested)
    overall = accuracy.filter(pl.col("negative_kind") == "all").row(0, named=True)
    context.log.info(
        f"reward_model: held-out pairwise accuracy {overall['learned_reward']:.3f} "
        f"(length baseline {overall['length_baseline']:.3f}, self-rating {overall['self_rating']:.3f})"
    )
    return dg.MaterializeResult(
        metadata=_reward_model_metadata(
            df, model_dir, train, tested, overall, audit, sign, accuracy, base_outputs, queries, device
        )
    )


def _seed_tasks(warehouse: Warehouse, config: RewardModelConfig) -> list[dict]:
    """The sampled seed tasks the pairs are built from: instruction, first input and its human output."""
    seeds = warehouse.read_table(SEED_POOL)
    if seeds is None or seeds.height == 0:
        raise dg.Failure("seed_pool is empty: materialize seed_pool first")
    seeds = sample_rows(seeds, config.max_seed_tasks, config.seed, order_by="id")
    return [
        dict(instruction_id=r["id"], instruction=r["instruction"], input=r["first_input"], output=r["first_output"])
        for r in seeds.iter_rows(named=True)
    ]


def _base_outputs(
    context: dg.AssetExecutionContext,
    config: RewardModelConfig,
    language_model: LanguageModelResource,
    base,
    tasks: list[dict],
) -> dict:
    """The base model's answer to each seed task by instruction id: the base_model negatives."""
    batch_size = language_model.generation_batch_size(config.generation_batch_size)
    prompts = [render_prompt(base.tokenizer, instance_prompt(t["instruction"]), INSTANCE_PREFIX) for t in tasks]
    report = progress_logger(context, REWARD_MODEL, batch_size * config.max_new_tokens)
    started = time.monotonic()
    with base.for_generation() as model:
        gens = model.generate(
            prompts,
            config.sampling_params(),
            batch_size,
            config.seed,
            lambda d, t, s: report(d, t, time.monotonic() - started),
        )
    # The base model's answer, where it wrote a complete one in the instance format.
    base_outputs = {}
    for t, g in zip(tasks, gens):
        parsed = parse_instance(INSTANCE_PREFIX + g.text)
        if parsed.status == "ok" and not (g.hit_token_limit and parsed.output_runs_to_end):
            base_outputs[t["instruction_id"]] = parsed.output
    return base_outputs


def _features(embedder, subset, which: str):
    """Embedding features of the subset's pairs with their `which` output (preferred or rejected)."""
    return features(
        embedder, [p.instruction for p in subset], [p.input for p in subset], [getattr(p, which) for p in subset]
    )


def _fit(
    context: dg.AssetExecutionContext,
    config: RewardModelConfig,
    feedback_scorer: FeedbackScorerResource,
    artifact_store: ArtifactStore,
    embedder,
    train: list,
) -> tuple:
    """Fits the Bradley-Terry weights on the train pairs and saves the model: (weights, model_dir, fitted)."""
    weights = fit_bradley_terry(
        _features(embedder, train, "preferred"), _features(embedder, train, "rejected"), config.seed
    )
    model_dir = artifact_store.run_dir(REWARD_MODEL, context.run_id) / "model"
    fitted = EmbeddingRewardModel(embedder, weights, embedding_id(feedback_scorer.embedding_model), context.run_id)
    fitted.save(model_dir)
    return weights, model_dir, fitted


def _rewards(embedder, pairs: list, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The learned rewards of every pair's preferred and rejected output."""
    return _features(embedder, pairs, "preferred") @ weights, _features(embedder, pairs, "rejected") @ weights


def _heldout_scores(judge, pairs: list, tested: list[int]) -> dict:
    """A judge's scores of the held-out pairs: pair index -> (preferred's score, rejected's score)."""
    scores = judge.score(
        [pairs[k].instruction for k in tested] * 2,
        [pairs[k].input for k in tested] * 2,
        [pairs[k].preferred for k in tested] + [pairs[k].rejected for k in tested],
    )
    return dict(zip(tested, zip(scores[: len(tested)], scores[len(tested) :])))


def _pair_rows(
    pairs: list,
    held: list[bool],
    preferred: np.ndarray,
    rejected: np.ndarray,
    sign: int,
    self_rating: dict,
    audit_scores: dict,
) -> list[dict]:
    """One row per preference pair: its slice, both rewards and whether each judge orders it right."""
    return [
        dict(
            instruction_id=p.instruction_id,
            negative_kind=p.kind,
            slice="heldout" if h else "train",
            instruction=p.instruction,
            input=p.input,
            preferred=p.preferred,
            rejected=p.rejected,
            preferred_reward=float(a),
            rejected_reward=float(b),
            correct=bool(a > b),
            length_correct=bool(sign * len(p.preferred.split()) > sign * len(p.rejected.split())),
            self_rating_correct=(self_rating[k][0] > self_rating[k][1]) if k in self_rating else None,
            audit_correct=_ordered(audit_scores.get(k)),
        )
        for k, (p, h, a, b) in enumerate(zip(pairs, held, preferred, rejected))
    ]


def _pairs_table(
    context: dg.AssetExecutionContext, rows: list[dict], model_dir, fitted: EmbeddingRewardModel, base, queries
) -> pl.DataFrame:
    """The asset's table: the pair rows with the fitted model, the base model and this run's queries."""
    return pl.DataFrame(
        rows, schema_overrides={"self_rating_correct": pl.Boolean, "audit_correct": pl.Boolean}
    ).with_columns(
        pl.lit(str(model_dir)).alias("model_dir"),
        pl.lit(fitted.version).alias("reward_model_version"),
        pl.lit(base.provenance.served_model).alias("model_id"),
        # This run's model queries, for the query ledger.
        pl.lit(queries.as_json()).alias("llm_queries"),
        pl.lit(context.run_id).alias("run_id"),
    )


def _heldout_accuracy(
    df: pl.DataFrame,
    pairs: list,
    preferred: np.ndarray,
    rejected: np.ndarray,
    sign: int,
    self_rating: dict,
    audit_scores: dict,
    tested: list[int],
) -> pl.DataFrame:
    """The held-out pairs' accuracy by negative kind, of the learned reward and of each baseline judge."""
    return _accuracy_by_kind(
        df.filter(pl.col("slice") == "heldout"),
        preferred[tested],
        rejected[tested],
        [sign * len(pairs[k].preferred.split()) for k in tested],
        [sign * len(pairs[k].rejected.split()) for k in tested],
        self_rating,
        audit_scores,
        tested,
    )


def _reward_model_metadata(
    df: pl.DataFrame,
    model_dir,
    train: list,
    tested: list[int],
    overall: dict,
    audit: InstructionPMIAudit,
    sign: int,
    accuracy: pl.DataFrame,
    base_outputs: dict,
    queries: QueryCounter,
    device,
) -> dict:
    """The asset's metadata: the table, the model folder, held-out accuracies against the baselines."""
    return {
        **table_metadata(
            df, ["negative_kind", "slice", "preferred_reward", "rejected_reward", "correct"], table=REWARD_MODEL
        ),
        "model_dir": dg.MetadataValue.path(str(model_dir)),
        "train_pairs": len(train),
        "heldout_pairs": len(tested),
        "heldout_accuracy": overall["learned_reward"],
        "heldout_accuracy_length_baseline": overall["length_baseline"],
        "heldout_accuracy_self_rating": overall["self_rating"],
        "heldout_accuracy_audit_judge": overall["audit_judge"],
        "audit_judge": audit.version,
        "length_baseline_prefers": "longer" if sign > 0 else "shorter",
        "accuracy_by_kind": metadata_table(accuracy, table=f"{REWARD_MODEL}/accuracy_by_kind"),
        "base_outputs_usable": len(base_outputs),
        "llm_queries": queries.as_json(),
        **peak_memory(device),
    }


def _or(value, default):
    return default if value is None else value


def _ordered(scores: tuple | None) -> bool | None:
    """Whether the preferred output scored higher (None: a score is missing)."""
    if scores is None or scores[0] is None or scores[1] is None:
        return None
    return scores[0] > scores[1]


def _accuracy_by_kind(
    heldout: pl.DataFrame,
    preferred: np.ndarray,
    rejected: np.ndarray,
    length_a,
    length_b,
    self_rating: dict,
    audit_scores: dict,
    tested: list[int],
) -> pl.DataFrame:
    kinds = heldout["negative_kind"].to_list()
    rows = []
    for kind in ("all", *KINDS):
        idx = [j for j, k in enumerate(kinds) if kind in ("all", k)]
        rows.append(
            dict(
                negative_kind=kind,
                heldout_pairs=len(idx),
                learned_reward=pairwise_accuracy(preferred[idx], rejected[idx]),
                length_baseline=pairwise_accuracy([length_a[j] for j in idx], [length_b[j] for j in idx]),
                self_rating=pairwise_accuracy(
                    [self_rating[tested[j]][0] for j in idx], [self_rating[tested[j]][1] for j in idx]
                ),
                # A missing audit score (an empty output) counts as a wrong order, a tie as one half.
                audit_judge=pairwise_accuracy(
                    [_or(audit_scores[tested[j]][0], -np.inf) for j in idx],
                    [_or(audit_scores[tested[j]][1], np.inf) for j in idx],
                ),
            )
        )
    return pl.DataFrame(rows)
