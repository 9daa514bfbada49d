"""Stage 2b: the RL-refined policy (LoRA adapter trained on the automated-feedback reward)."""


import json
import math
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.rl_training import RLSettings, train_policy
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse

from .metadata import png_markdown, table_metadata
from .shared import base_component_stats, is_held_out, kept_instructions


class RLConfig(dg.Config):
    algorithm: str = "grpo"  # grpo | rloo
    max_steps: int = 6
    prompts_per_step: int = 2
    group_size: int = 4
    learning_rate: float = 1e-4
    beta: float = 0.04
    max_completion_length: int = 48
    temperature: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    gradient_checkpointing: bool = False
    heldout_share: float = 0.2  # kept instructions RL never trains on


@dg.asset(group_name="rl", kinds={"duckdb", "pytorch"}, deps=["reward_scores", "deduplicated_instructions"], pool="gpu")
def rl_refined_policy(context: dg.AssetExecutionContext, config: RLConfig, warehouse: Warehouse,
                      language_model: LanguageModelResource, feedback_scorer: FeedbackScorerResource,
                      artifact_store: ArtifactStore) -> dg.MaterializeResult:
    """A LoRA adapter trained with TRL's GRPO (or RLOO) to write input/output instances that the
    automated feedback rewards, KL-regularised towards the base model. The adapter goes to the
    artifact store; the per-step log (reward, components, KL, loss, completion length, format-gate
    failures) is this asset's table."""
    settings = RLSettings(**{k: v for k, v in config.model_dump().items() if k != "heldout_share"})
    kept = kept_instructions(warehouse)
    train = kept.filter(~pl.col("instruction_id").map_elements(lambda i: is_held_out(i, config.heldout_share),
                                                               return_dtype=pl.Boolean))
    if train.height == 0:
        raise dg.Failure("every kept instruction is held out; lower heldout_share or grow the pool")
    stats = base_component_stats(warehouse)
    policy, tokenizer, source, device = language_model.load()
    judge, judge_tokenizer, _, _ = language_model.load()  # a separate copy: LoRA is injected into the policy
    scorer = feedback_scorer.build(judge, judge_tokenizer, device, stats, language_model.batch_size)
    out_dir = artifact_store.run_dir("rl_refined_policy", context.run_id)
    started = time.monotonic()

    def on_log(step, total, logs):
        if "reward" in logs:
            context.log.info(f"RL step {step}/{total}: reward {logs['reward']:.3f}, kl {logs.get('kl', math.nan):.4f}, "
                             f"{time.monotonic() - started:.0f} s elapsed")

    context.log.info(f"RL ({settings.algorithm}) on {train.height} instructions ({kept.height - train.height} held out), "
                     f"{source.model_id} on {device}")
    result = train_policy(policy, tokenizer, train["instruction"].to_list(), scorer, settings, out_dir, device, on_log)
    seconds = time.monotonic() - started
    df = pl.DataFrame(result.log).with_columns(
        pl.lit(context.run_id).alias("run_id"), pl.lit(str(result.adapter_dir)).alias("adapter_path"),
        pl.lit(source.model_id).alias("base_model_id"), pl.lit(json.dumps(config.model_dump())).alias("settings"),
    )
    warehouse.write_table("rl_refined_policy", df)
    from refine_af_pipeline.plots import line_chart_png

    curves = {c: df[c].to_list() for c in ("reward", "kl", "completion_length", "gate_failure_share") if c in df.columns}
    last = df.row(-1, named=True) if df.height else {}
    return dg.MaterializeResult(metadata={
        **table_metadata(df, ["step", "reward", "kl", "loss", "completion_length"]),
        "adapter_path": dg.MetadataValue.path(str(result.adapter_dir)),
        "training_curves": png_markdown(line_chart_png(df["step"].to_list(), curves, f"{settings.algorithm.upper()} training"), "RL curves"),
        "final_reward": float(last.get("reward", math.nan)),
        "final_kl": float(last.get("kl", math.nan)),
        "first_reward": float(df["reward"][0]) if df.height else math.nan,
        "train_instructions": train.height,
        "train_seconds": round(seconds, 1),
    })
