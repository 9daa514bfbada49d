"""Stage 2a: automated-feedback scores of the base model's instances."""


import json

import dagster as dg
import polars as pl

from refine_af_pipeline.calibration import calibrate, read_ratings
from refine_af_pipeline.feedback import COMPONENTS
from refine_af_pipeline.instances import RewardScoresSettings, generate_scored_instances, restandardise
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse

from .metadata import peak_memory, progress_logger, table_metadata
from .shared import kept_instructions, subset


class RewardScoresConfig(dg.Config, RewardScoresSettings):
    """Run config of `reward_scores`: the fields of RewardScoresSettings (refine_af_pipeline/instances.py)."""


@dg.asset(group_name="feedback", kinds={"duckdb", "pytorch"}, deps=["deduplicated_instructions"], pool="gpu")
def reward_scores(context: dg.AssetExecutionContext, config: RewardScoresConfig, warehouse: Warehouse,
                  language_model: LanguageModelResource, feedback_scorer: FeedbackScorerResource) -> dg.MaterializeResult:
    """The base model writes one input/output instance per kept instruction and the automated
    feedback scores it: one column per component (preference, naturalness, coherence,
    understandability) with the judge that produced it (`<component>_scorer`), the format gate's
    reason, and the combined reward. These scores fix the mean and spread that standardise every
    later reward; with `calibration_csv` on the feedback_scorer resource, the weights and bias are
    fitted to those human ratings here and every later reward uses them."""
    # A bad ratings file fails the run before any generation.
    ratings = read_ratings(feedback_scorer.calibration_csv) if feedback_scorer.calibration_csv else None
    chosen = subset(kept_instructions(warehouse), config.max_instructions, config.seed)
    model, tokenizer, source, device = language_model.load()
    scorer = feedback_scorer.build(model, tokenizer, device, batch_size=language_model.scoring_batch_size,
                                   judge_id=source.model_id)
    params = config.sampling_params()
    batch_size = language_model.generation_batch_size("reward_scores")
    rows = generate_scored_instances(model, tokenizer, scorer, chosen["instruction"].to_list(), params, batch_size,
                                     config.seed, progress_logger(context, "reward_scores", batch_size * config.max_new_tokens))
    ids = chosen["instruction_id"].to_list()
    weights, bias, weights_source = scorer.weights, scorer.bias, "config"
    stats = restandardise(rows, weights, bias)
    calibration_metadata = {}
    if ratings is not None:
        fit = calibrate(ids, rows, stats, ratings, list(weights))
        weights, bias, weights_source = fit.weights, fit.bias, f"calibration:{feedback_scorer.calibration_csv}"
        restandardise(rows, weights, bias)  # same stats, fitted weights
        context.log.info(f"calibrated weights on {fit.n} rated instances: {weights}, bias {bias:.3f}, R2 {fit.r2:.2f}")
        calibration_metadata = {"calibration_instances": fit.n, "calibration_rmse": fit.rmse,
                                "calibration_r2": fit.r2, "calibration_skipped": dg.MetadataValue.json(fit.skipped)}
    versions = scorer.versions()
    df = pl.DataFrame(
        [dict(instruction_id=i, **r, model_id=source.model_id, scorers=json.dumps(versions),
              **{f"{c}_scorer": versions[c] for c in COMPONENTS},
              weights=json.dumps(weights), bias=float(bias), weights_source=weights_source,
              sampling_params=json.dumps(params.as_dict()), run_id=context.run_id)
         for i, r in zip(ids, rows)],
        schema_overrides={c: pl.Float64 for c in COMPONENTS} | {"gate_reason": pl.Utf8},
    )
    warehouse.write_table("reward_scores", df)
    passed = df.filter(pl.col("gate_reason").is_null())
    return dg.MaterializeResult(metadata={
        **table_metadata(df, ["instruction", "output", "reward", *COMPONENTS]),
        "mean_reward": float(df["reward"].mean()),
        "format_gate_pass_rate": passed.height / max(df.height, 1),
        **{f"mean_{c}": float(stats.mean[c]) for c in COMPONENTS},
        "scorers": dg.MetadataValue.json(versions),
        "weights": dg.MetadataValue.json({**weights, "bias": bias}),
        "weights_source": weights_source,
        **calibration_metadata,
        **peak_memory(device),
    })
