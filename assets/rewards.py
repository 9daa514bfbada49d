"""Stage 2a: automated-feedback scores of the base model's instances."""


import json

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback import COMPONENTS
from refine_af_pipeline.generation import SamplingParams
from refine_af_pipeline.instances import generate_scored_instances, restandardise
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse

from .metadata import progress_logger, table_metadata
from .shared import kept_instructions, subset


class RewardScoresConfig(dg.Config):
    max_instructions: int = 16  # 0 = every kept instruction
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


@dg.asset(group_name="feedback", kinds={"duckdb", "pytorch"}, deps=["deduplicated_instructions"], pool="gpu")
def reward_scores(context: dg.AssetExecutionContext, config: RewardScoresConfig, warehouse: Warehouse,
                  language_model: LanguageModelResource, feedback_scorer: FeedbackScorerResource) -> dg.MaterializeResult:
    """The base model writes one input/output instance per kept instruction and the automated
    feedback scores it: one column per component (preference, naturalness, coherence,
    understandability), the format gate's reason, and the combined reward. These scores also fix
    the mean and spread that standardise every later reward."""
    chosen = subset(kept_instructions(warehouse), config.max_instructions, config.seed)
    model, tokenizer, source, device = language_model.load()
    scorer = feedback_scorer.build(model, tokenizer, device, batch_size=language_model.batch_size)
    params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p, do_sample=True)
    rows = generate_scored_instances(model, tokenizer, scorer, chosen["instruction"].to_list(), params,
                                     language_model.batch_size, config.seed,
                                     progress_logger(context, "reward_scores", language_model.batch_size * config.max_new_tokens))
    stats = restandardise(rows, feedback_scorer.weights, feedback_scorer.bias)
    versions = feedback_scorer.scorer_versions()
    df = pl.DataFrame(
        [dict(instruction_id=i, **r, model_id=source.model_id, scorers=json.dumps(versions),
              weights=json.dumps(feedback_scorer.weights), sampling_params=json.dumps(params.as_dict()),
              run_id=context.run_id)
         for i, r in zip(chosen["instruction_id"].to_list(), rows)],
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
    })
