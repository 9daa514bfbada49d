"""Stage 2a: automated-feedback scores of the base model's instances, and the standardisation
(component means and spreads, weights, bias) that every later reward uses."""

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback.calibration import Rating, calibrate, read_ratings
from refine_af_pipeline.feedback.scores import COMPONENTS, ComponentStats
from refine_af_pipeline.instructions.instances import RewardScoresSettings, generate_scored_instances, restandardise
from refine_af_pipeline.llm.query_count import QueryCounter
from refine_af_pipeline.training.splits import sample_rows
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.warehouse import insert_rows

from . import groups
from .columns import declare
from .instructions import current_pool
from .metadata import peak_memory, progress_logger, table_metadata
from .reward_model import REWARD_MODEL
from .shared import (
    POOL_DEPS,
    SCORED_INSTANCE_COLUMNS,
    STANDARDISATION,
    kept_instructions,
    learned_reward_dir,
    scored_instance_frame,
    standardisation_frame,
)

REWARD_SCORES = "reward_scores"
COLUMNS = declare(
    {
        REWARD_SCORES: dict(SCORED_INSTANCE_COLUMNS),
        STANDARDISATION: {
            **{
                f"mean_{c}": f"mean raw {c} of the base model's instances that passed the instance gate"
                for c in COMPONENTS
            },
            **{f"std_{c}": f"standard deviation of raw {c} over those instances (1 when constant)" for c in COMPONENTS},
            **{f"weight_{c}": f"weight of the standardised {c} in the combined reward" for c in COMPONENTS},
            "bias": "bias of the combined reward",
            "weights_source": "where the weights come from: config, or calibration:<ratings file>",
            "standardised_instances": "base-model instances the means and spreads were computed over",
            "model_id": "the base model whose instances were standardised, by the name it was served as",
        },
    }
)


class RewardScoresConfig(dg.Config, RewardScoresSettings):
    """Run config of `reward_scores`: the fields of RewardScoresSettings
    (refine_af_pipeline/instructions/instances.py)."""


@dg.multi_asset(
    name=REWARD_SCORES,
    group_name=groups.SHARED_POOL,
    pool="gpu",
    can_subset=False,
    specs=[
        dg.AssetSpec(
            REWARD_SCORES,
            deps=[*POOL_DEPS, REWARD_MODEL],
            kinds={"duckdb", "pytorch"},
            description=(
                "The base model writes one input/output instance per kept instruction and the automated feedback "
                "scores it: one column per component (preference, naturalness, coherence, understandability, "
                "learned_reward) with "
                "the judge that produced it (`<component>_scorer`), the instance gate's reason, and the combined "
                "reward."
            ),
        ),
        dg.AssetSpec(
            STANDARDISATION,
            deps=[REWARD_SCORES],
            kinds={"duckdb"},
            description=(
                "One row: the mean and standard deviation of each feedback component over the base model's "
                "gate-passing instances in reward_scores, the weights and bias that combine the "
                "standardised components, and where the weights come from (the feedback_scorer config, or "
                "calibration:<ratings file> when `calibration_csv` fitted them to human ratings). The RL stage, "
                "both instance stages and the held-out comparison standardise every reward with it."
            ),
        ),
    ],
)
def reward_scores(
    context: dg.AssetExecutionContext,
    config: RewardScoresConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    feedback_scorer: FeedbackScorerResource,
):
    """Generates and scores the base model's instances, fixes the standardisation from them (and,
    with `calibration_csv` on the feedback_scorer resource, fits the weights and bias to those
    human ratings), then writes both tables in one transaction."""
    ratings = _ratings(feedback_scorer)  # a bad ratings file fails the run before any generation
    chosen = sample_rows(kept_instructions(warehouse, context), config.max_instructions, config.seed)
    pool = current_pool(warehouse)
    queries = QueryCounter()
    model = queries.wrap(language_model.open_models({"base": None})["base"], "generator", scoring_role="judge")
    device = language_model.resolved_device()
    scorer = feedback_scorer.build(
        model,
        device,
        batch_size=language_model.scoring_batch_size,
        learned_reward_dir=learned_reward_dir(warehouse, feedback_scorer),
    )
    params = config.sampling_params()
    batch_size = language_model.generation_batch_size(config.generation_batch_size)
    rows = generate_scored_instances(
        model,
        scorer,
        chosen["instruction"].to_list(),
        params,
        batch_size,
        config.seed,
        progress_logger(context, REWARD_SCORES, batch_size * config.max_new_tokens),
        chosen["is_classification"].to_list(),
    )
    ids = chosen["instruction_id"].to_list()
    weights, bias, weights_source = scorer.weights, scorer.bias, "config"
    stats = restandardise(rows, weights, bias, scorer.gate.reward)
    calibration_metadata = {}
    if ratings is not None:
        weights, bias, weights_source, calibration_metadata = _calibrated(
            context, ids, rows, stats, ratings, weights, scorer.gate.reward, feedback_scorer.calibration_csv
        )
    versions = scorer.versions()
    df = scored_instance_frame(
        [{"instruction_id": i} for i in ids], rows, model.provenance, versions, params, context.run_id
    ).with_columns(pl.lit(queries.as_json()).alias("llm_queries"))  # this run's model queries, for the query ledger
    passed = df.filter(pl.col("gate_reason").is_null())
    standardisation = standardisation_frame(
        stats, weights, bias, weights_source, passed.height, model.provenance.served_model, context.run_id, pool
    )
    with warehouse.transaction() as conn:
        insert_rows(conn, REWARD_SCORES, df, mode="replace")
        insert_rows(conn, STANDARDISATION, standardisation, mode="replace")
    yield dg.MaterializeResult(
        asset_key=REWARD_SCORES, metadata=_reward_scores_metadata(df, passed, versions, queries, device)
    )
    yield dg.MaterializeResult(
        asset_key=STANDARDISATION,
        metadata=_standardisation_metadata(
            standardisation, stats, weights, bias, weights_source, passed.height, calibration_metadata
        ),
    )


def _ratings(feedback_scorer: FeedbackScorerResource) -> list[Rating] | None:
    """The human ratings in the feedback_scorer's `calibration_csv`, or None without one."""
    return (
        read_ratings(feedback_scorer.calibration_csv, feedback_scorer.gate_reward)
        if feedback_scorer.calibration_csv
        else None
    )


def _calibrated(
    context: dg.AssetExecutionContext,
    ids: list[str],
    rows: list[dict],
    stats: ComponentStats,
    ratings: list[Rating],
    weights: dict[str, float],
    gate_reward: float,
    calibration_csv: str,
) -> tuple[dict[str, float], float, str, dict]:
    """Fits the weights and bias to the human ratings and restandardises: (weights, bias, source, metadata)."""
    fit = calibrate(ids, rows, stats, ratings, list(weights))
    weights, bias, weights_source = fit.weights, fit.bias, f"calibration:{calibration_csv}"
    restandardise(rows, weights, bias, gate_reward)  # same stats, fitted weights
    context.log.info(f"calibrated weights on {fit.n} rated instances: {weights}, bias {bias:.3f}, R2 {fit.r2:.2f}")
    calibration_metadata = {
        "calibration_instances": fit.n,
        "calibration_rmse": fit.rmse,
        "calibration_r2": fit.r2,
        "calibration_skipped": dg.MetadataValue.json(fit.skipped),
    }
    return weights, bias, weights_source, calibration_metadata


def _reward_scores_metadata(
    df: pl.DataFrame, passed: pl.DataFrame, versions: dict, queries: QueryCounter, device: str
) -> dict:
    """The scored instances' metadata: table, mean reward, gate pass rate, scorers, queries, peak memory."""
    return {
        **table_metadata(df, ["instruction", "output", "reward", *COMPONENTS], table=REWARD_SCORES),
        "mean_reward": float(df["reward"].mean()),
        "gate_pass_rate": passed.height / max(df.height, 1),
        "scorers": dg.MetadataValue.json(versions),
        "llm_queries": queries.as_json(),
        **peak_memory(device),
    }


def _standardisation_metadata(
    standardisation: pl.DataFrame,
    stats: ComponentStats,
    weights: dict[str, float],
    bias: float,
    weights_source: str,
    instances: int,
    calibration_metadata: dict,
) -> dict:
    """The standardisation's metadata: table, component means and spreads, weights, their source, the fit."""
    return {
        **table_metadata(standardisation, table=STANDARDISATION),
        **{f"mean_{c}": float(stats.mean[c]) for c in COMPONENTS},
        **{f"std_{c}": float(stats.std[c]) for c in COMPONENTS},
        "weights": dg.MetadataValue.json({**weights, "bias": bias}),
        "weights_source": weights_source,
        "instances": instances,
        **calibration_metadata,
    }
