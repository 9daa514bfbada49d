"""Stage 2b: the RL-refined policy (LoRA adapter trained on the automated-feedback reward)."""

import dataclasses
import json
import math
import time
from pathlib import Path

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback.scores import COMPONENTS
from refine_af_pipeline.llm.adapters import AdapterView
from refine_af_pipeline.llm.query_count import QueryCounter
from refine_af_pipeline.training.rl import RLResult, RLSettings, train_policy
from refine_af_pipeline.training.rl_diagnostics import reward_hacking_warnings
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.training_launcher import TrainingLauncherResource, training_spec

from . import groups
from .checkpointing import resume_metadata, training_checkpoints
from .columns import declare
from .instructions import current_pool
from .metadata import peak_memory, png_markdown, table_metadata
from .reward_model import REWARD_MODEL
from .shared import (
    POOL_DEPS,
    STANDARDISATION,
    base_component_stats,
    kept_instructions,
    learned_reward_dir,
    require_pool,
    rl_heldout_split,
)

RL_POLICY = "rl_refined_policy"
COLUMNS = declare(
    {
        RL_POLICY: {
            "step": "optimizer step of the RL run (1-based)",
            "reward": "mean combined reward of the step's completions",
            "reward_std": "standard deviation of the combined reward over the step's completions",
            "kl": "mean per-token KL divergence to the base model (TRL's estimate; NaN when beta is 0)",
            "loss": "trainer loss of the step",
            "completion_length": "mean completion length of the step (tokens)",
            "clipped_share": "share of the step's completions cut at max_completion_length (0-1)",
            "entropy": "mean per-token entropy of the policy on its completions (nats)",
            "gate_failure_share": "share of the step's completions the instance gate rejected (0-1)",
            "repeat_share": "mean share of repeated word 3-grams within a completion (0 = none, near 1 = a looped "
            "phrase)",
            **{
                f"{c}_mean": f"mean raw {c} over the step's completions that passed the instance gate"
                for c in COMPONENTS
            },
            "adapter_path": "directory of the trained LoRA adapter (the RL policy)",
            "heldout_share": "share of kept instructions held out from RL (the share actually used, after min_heldout)",
        }
    }
)


class RLConfig(dg.Config, RLSettings):
    """Run config of `rl_refined_policy`: the fields of RLSettings (refine_af_pipeline/training/rl.py)."""


@dg.asset(
    group_name=groups.REFINE_AF,
    kinds={"duckdb", "pytorch"},
    deps=[STANDARDISATION, *POOL_DEPS, REWARD_MODEL],
    pool="gpu",
)
def rl_refined_policy(
    context: dg.AssetExecutionContext,
    config: RLConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    feedback_scorer: FeedbackScorerResource,
    artifact_store: ArtifactStore,
    training_launcher: TrainingLauncherResource,
) -> dg.MaterializeResult:
    """A LoRA adapter trained with TRL's GRPO (or RLOO) to write input/output instances that the
    automated feedback rewards, KL-regularised towards the base model. The adapter goes to the
    artifact store; the per-step log (reward, component means, KL, loss, completion length, share
    cut at the token limit, instance-gate failures, repeated 3-gram share) is this asset's table, and
    the metadata warns when length or repetition trends suggest reward hacking."""
    kept, share, train = _train_instructions(context, config, warehouse)
    pool = current_pool(warehouse)
    require_pool(warehouse, STANDARDISATION, pool)
    stats = base_component_stats(warehouse)
    source, device = language_model.source(), language_model.resolved_device()
    training_launcher.check_devices(device)
    queries = QueryCounter()
    out_dir = artifact_store.run_dir(RL_POLICY, context.run_id)
    reward_dir = learned_reward_dir(warehouse, feedback_scorer)
    checkpoints = training_checkpoints(
        context,
        artifact_store,
        RL_POLICY,
        config.checkpoint_every_steps,
        settings=config.model_dump(exclude={"checkpoint_every_steps"}),
        instructions=train.select("instruction", "is_classification").rows(),
        model=source.model_id,
        standardisation=stats,
        scorer=feedback_scorer.model_dump(),
        learned_reward=reward_dir,
    )
    context.log.info(
        f"RL ({config.algorithm}) on {train.height} instructions ({kept.height - train.height} held out), "
        f"{source.model_id} on {device}"
    )
    started = time.monotonic()
    if training_launcher.distributed:
        result = _train_distributed(
            context,
            config,
            train,
            language_model,
            feedback_scorer,
            training_launcher,
            stats,
            reward_dir,
            out_dir,
            checkpoints,
            queries,
        )
    else:
        # The judge is the base model: under transformers the policy's own weights with its LoRA
        # adapter switched off (bound once the trainer has wrapped the policy), else the chosen engine's.
        policy, tokenizer, source, device = language_model.load()
        judge = AdapterView()
        scorer = feedback_scorer.build(
            queries.wrap(language_model.judge_model(judge, tokenizer, source), "judge"),
            device,
            stats,
            language_model.scoring_batch_size,
            reward_dir,
        )
        result = _train(context, config, train, policy, tokenizer, device, scorer, judge, out_dir, started, checkpoints)
    seconds = time.monotonic() - started
    # TRL generates the completions itself: one generator query per completion of every step this run took.
    queries.add("generator", result.steps_taken * config.prompts_per_step * config.group_size)
    df = _step_table(context, config, result, source, share, queries).with_columns(pl.lit(pool).alias("pool"))
    warehouse.write_table(RL_POLICY, df)
    warnings = reward_hacking_warnings(result.log, config.max_completion_length)
    for line in warnings:
        context.log.warning(f"possible reward hacking: {line}")
    return dg.MaterializeResult(
        metadata=_policy_metadata(df, config, result, warnings, kept, train, share, seconds, queries, device)
    )


def _train_instructions(context: dg.AssetExecutionContext, config: RLConfig, warehouse: Warehouse) -> tuple:
    """The kept instructions, the share held out from RL and the instructions RL trains on."""
    kept = kept_instructions(warehouse, context)
    split = rl_heldout_split(kept["instruction_id"].to_list(), config.heldout_share, config.min_heldout)
    share = split.share
    train = kept.filter(~pl.col("instruction_id").is_in(list(split.held)))
    if train.height == 0:
        raise dg.Failure("every kept instruction is held out; lower heldout_share or grow the pool")
    return kept, share, train


def _train(
    context: dg.AssetExecutionContext,
    config: RLConfig,
    train: pl.DataFrame,
    policy,
    tokenizer,
    device,
    scorer,
    judge: AdapterView,
    out_dir,
    started: float,
    checkpoints,
):
    """Runs the RL trainer in this process on the train instructions, logging the reward and KL
    of each logged step."""

    def on_log(step, total, logs):
        if "reward" in logs:
            context.log.info(
                f"RL step {step}/{total}: reward {logs['reward']:.3f}, kl {logs.get('kl', math.nan):.4f}, "
                f"{time.monotonic() - started:.0f} s elapsed"
            )

    return train_policy(
        policy,
        tokenizer,
        train["instruction"].to_list(),
        scorer,
        config,
        out_dir,
        device,
        on_log,
        base_view=judge,
        is_classification=train["is_classification"].to_list(),
        checkpoints=checkpoints,
    )


def _train_distributed(
    context: dg.AssetExecutionContext,
    config: RLConfig,
    train: pl.DataFrame,
    language_model: LanguageModelResource,
    feedback_scorer: FeedbackScorerResource,
    training_launcher: TrainingLauncherResource,
    stats,
    reward_dir: str | None,
    out_dir,
    checkpoints,
    queries: QueryCounter,
) -> RLResult:
    """The RL trainer as torchrun processes (training_launcher): each loads the policy and judges
    its share of each step's completions with its own base weights; their judge queries are added
    to `queries`."""
    spec = {
        **training_spec("rl", language_model, config.model_dump(), out_dir, checkpoints),
        "instructions": train["instruction"].to_list(),
        "is_classification": train["is_classification"].to_list(),
        "feedback_scorer": feedback_scorer.model_dump(),
        "stats": dataclasses.asdict(stats),
        "learned_reward_dir": reward_dir,
        "scoring_batch_size": language_model.scoring_batch_size,
        "max_batch_tokens": language_model.max_batch_tokens,
    }
    done = training_launcher.train(context, spec, out_dir / "torchrun", language_model.resolved_device())
    queries.add("judge", done["judge_queries"])
    return RLResult(
        Path(done["adapter_dir"]), done["log"], done["resumed_from_step"], done["steps_taken"], done["world_size"]
    )


def _step_table(
    context: dg.AssetExecutionContext, config: RLConfig, result, source, share: float, queries: QueryCounter
) -> pl.DataFrame:
    """The asset's table: the per-step log with the adapter, base model, settings, share and queries."""
    return pl.DataFrame(result.log).with_columns(
        pl.lit(context.run_id).alias("run_id"),
        pl.lit(str(result.adapter_dir)).alias("adapter_path"),
        pl.lit(source.model_id).alias("base_model_id"),
        pl.lit(json.dumps(config.model_dump())).alias("settings"),
        # The share actually held out: the held-out check selects its instructions with it.
        pl.lit(share).alias("heldout_share"),
        # This run's model queries, for the query ledger.
        pl.lit(queries.as_json()).alias("llm_queries"),
    )


def _policy_metadata(
    df: pl.DataFrame,
    config: RLConfig,
    result,
    warnings: list[str],
    kept: pl.DataFrame,
    train: pl.DataFrame,
    share: float,
    seconds: float,
    queries: QueryCounter,
    device,
) -> dict:
    """The asset's metadata: the table, the adapter, the curves, final figures and reward-hacking warnings."""
    return {
        **table_metadata(
            df,
            ["step", "reward", "kl", "completion_length", "gate_failure_share", "repeat_share"],
            table=RL_POLICY,
        ),
        "adapter_path": dg.MetadataValue.path(str(result.adapter_dir)),
        **training_curves(df, config.algorithm),
        **final_figures(df),
        **reward_trend(df),
        "reward_hacking_warnings": "; ".join(warnings) if warnings else "none seen",
        "train_instructions": train.height,
        "heldout_instructions": kept.height - train.height,
        "heldout_share": share,
        "train_seconds": round(seconds, 1),
        "training_processes": result.world_size,
        **resume_metadata(result.resumed_from_step, result.steps_taken),
        "llm_queries": queries.as_json(),
        **peak_memory(device),
    }


def training_curves(df: pl.DataFrame, algorithm: str) -> dict:
    from refine_af_pipeline.plots import line_chart_png

    def chart(columns, title, alt):
        curves = {c: df[c].to_list() for c in columns if c in df.columns}
        return png_markdown(line_chart_png(df["step"].to_list(), curves, title), alt)

    return {
        "training_curves": chart(["reward", "kl", "gate_failure_share"], f"{algorithm.upper()} training", "RL curves"),
        "component_curves": chart([f"{c}_mean" for c in COMPONENTS], "feedback components (raw means)", "components"),
        "reward_hacking_curves": chart(
            ["completion_length", "clipped_share", "repeat_share"],
            "length, share at the token limit, repeated 3-grams",
            "hacking indicators",
        ),
    }


def final_figures(df: pl.DataFrame) -> dict:
    if df.height == 0:
        return {}
    first, last = df.row(0, named=True), df.row(-1, named=True)
    columns = [
        "reward",
        "kl",
        "completion_length",
        "clipped_share",
        "gate_failure_share",
        "repeat_share",
        *(f"{c}_mean" for c in COMPONENTS),
    ]
    figures = {f"final_{c}": float(last[c]) for c in columns if c in last and last[c] is not None}
    figures["first_reward"] = float(first["reward"])
    return figures


def reward_trend(df: pl.DataFrame) -> dict:
    """Mean training reward of the first third of the steps and of the last third, and their
    difference: whether the reward rose within the run at all."""
    rewards = [r for r in df["reward"].to_list() if r is not None and not math.isnan(r)] if df.height else []
    if len(rewards) < 2:
        return {}
    width = max(1, len(rewards) // 3)
    first, last = sum(rewards[:width]) / width, sum(rewards[-width:]) / width
    return {"reward_first_third": first, "reward_last_third": last, "reward_trend": last - first}
