"""Stage 4: supervised fine-tuning of the base model on kept instruction/input/output triples.

`sft_training_pairs` draws the same number of training and validation pairs from every arm's kept
pairs (refine_af_pipeline/training/matched_data.py); one factory builds each arm's fine-tuned model
on its draw, with the SFT settings recorded with it (sft_training_pairs' `sft` section); none has a config."""

import json
import time
from pathlib import Path

import dagster as dg
import polars as pl

from refine_af_pipeline.plots import line_chart_png
from refine_af_pipeline.training.matched_data import ArmDraw, MatchedDataSettings, draw_matched
from refine_af_pipeline.training.sft import SFTResult, SFTSettings, finetune, validation_never_improved
from resources import ArtifactStore, LanguageModelResource, Warehouse
from resources.training_launcher import TrainingLauncherResource, training_spec

from . import groups
from .checkpointing import training_checkpoints
from .columns import declare
from .instance_pairs import BESTOFN_PAIRS, INSTANCE_PAIRS, SELFINSTRUCT_PAIRS
from .metadata import metadata_table, peak_memory, png_markdown, table_metadata
from .teams import EXPERT_PAIRS

SFT_DATA = "sft_training_pairs"
FINETUNED = "finetuned_model"
SELFINSTRUCT_FINETUNED = "selfinstruct_finetuned_model"
BESTOFN_FINETUNED = "bestofn_finetuned_model"
TEAMS_FINETUNED = "teams_finetuned_model"
# arm -> (its kept pairs, whether it writes instances for the shared pool of kept instructions)
ARM_PAIRS = {
    "refine_af": (INSTANCE_PAIRS, True),
    "self_instruct": (SELFINSTRUCT_PAIRS, True),
    "best_of_n": (BESTOFN_PAIRS, True),
    "teams_rl": (EXPERT_PAIRS, False),
}
_EPOCH_LOG = {
    "epoch": "epoch of supervised fine-tuning (0 = before the first step)",
    "steps": "optimizer steps so far",
    "step_losses": "training loss of each optimizer step in the epoch",
    "train_loss": "mean training loss of the epoch's steps (epoch 0: measured on the training pairs), nats per "
    "response token",
    "validation_loss": "loss on the validation pairs after the epoch, nats per response token (NaN without "
    "validation pairs)",
    "adapter_path": "directory of the replicate's trained LoRA adapter",
    "train_examples": "pairs trained on",
    "validation_examples": "pairs held out for validation",
    "train_table": "table the arm's pairs came from (drawn in sft_training_pairs)",
    "settings": "the replicate's SFT settings as JSON (its seed: the configured one + replicate)",
    "validation_instruction_ids": "instruction ids whose pairs form the validation slice, as a JSON list",
    "resumed_from_step": "the checkpoint step this replicate's training went on from after a killed run (0: trained "
    "from the start)",
    "training_processes": "processes that trained the adapter together (1: in the step; more: torchrun)",
}
COLUMNS = declare(
    {
        SFT_DATA: {
            "slice": "which part of the arm's draw the pair is in: train or validation",
            "reward": "the pair's training reward: the combined reward it was kept with (null for TeaMs-RL: its "
            "answers are not scored)",
            "source_table": "table the pair came from",
            "draw_rank": "position of the pair in its branch's stable-hash draw order (0-based)",
        },
        f"{SFT_DATA}/per_arm": {
            "kept_pairs": "kept pairs the branch had to draw from",
            "train_pairs": "training pairs of the branch",
            "validation_pairs": "validation pairs of the branch",
            "target_train": "training pairs every branch should get (sft_pairs, or the smallest branch's count)",
            "target_validation": "validation pairs every branch should get (the smallest branch's count)",
            "shared_train_instructions": "training instructions every other branch on the shared pool trains on too",
        },
        **{name: _EPOCH_LOG for name in (FINETUNED, SELFINSTRUCT_FINETUNED, BESTOFN_FINETUNED, TEAMS_FINETUNED)},
    }
)
# arm -> the UI group of its branch
ARM_GROUPS = {
    "refine_af": groups.REFINE_AF,
    "self_instruct": groups.SELF_INSTRUCT,
    "best_of_n": groups.BEST_OF_N,
    "teams_rl": groups.TEAMS_RL,
}
_PAIR_COLUMNS = ("instance_id", "instruction_id", "instruction", "input", "output")
CHECK_NAME = "every_arm_has_its_pairs"


class SFTConfig(dg.Config, SFTSettings):
    """The SFT settings of every arm's fine-tuned model: the fields of SFTSettings
    (refine_af_pipeline/training/sft.py)."""


class MatchedDataConfig(dg.Config, MatchedDataSettings):
    """Run config of `sft_training_pairs`: the fields of MatchedDataSettings
    (refine_af_pipeline/training/matched_data.py), `sft` among them: the SFT settings every arm trains
    with, recorded with the draw."""

    sft: SFTConfig = SFTConfig()  # the core's field, as a Dagster config so the launchpad shows its fields


@dg.asset(
    name=SFT_DATA,
    group_name=groups.EVALUATION,
    kinds={"duckdb"},
    deps=[t for t, _ in ARM_PAIRS.values()],
    check_specs=[
        dg.AssetCheckSpec(
            CHECK_NAME,
            asset=SFT_DATA,
            description=(
                "Warns when an arm has fewer training or validation pairs than the others get, or is missing: "
                "its fine-tuned model is then compared on less data."
            ),
        )
    ],
)
def sft_training_pairs(
    context: dg.AssetExecutionContext, config: MatchedDataConfig, warehouse: Warehouse
) -> dg.MaterializeResult:
    """The pairs each arm's SFT trains and validates on: the same number for every arm (`sft_pairs`,
    or the smallest arm's count), drawn by a stable hash; REFINE-AF, Self-Instruct (and any arm on
    the same instruction pool) train on the same instructions as far as they all kept them. One row
    per drawn pair: branch, slice (train / validation), the pair, and the table it came from."""
    arms, missing = _kept_pairs_by_arm(warehouse)
    if not arms:
        raise dg.Failure(f"no arm has kept pairs: materialize {', '.join(t for t, _ in ARM_PAIRS.values())} first")
    # One draw per replicate; an arm without replicates (TeaMs-RL) brings the same pairs to each.
    replicates = sorted({r["replicate"] for rows in arms.values() for r in rows if r["replicate"] is not None}) or [0]
    rows, per_arm, problems, short = _draw_replicates(arms, replicates, config)
    problems += [f"{arm} has no kept pairs in {ARM_PAIRS[arm][0]}" for arm in missing]
    df = pl.DataFrame(rows, schema_overrides={"reward": pl.Float64}).with_columns(
        pl.lit(json.dumps(config.model_dump())).alias("settings"), pl.lit(context.run_id).alias("run_id")
    )
    warehouse.write_table(SFT_DATA, df)
    for line in problems:
        context.log.warning(f"{SFT_DATA}: {line}: its model is compared on less data")
    figures = _draw_figures(per_arm, replicates, short, missing)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["branch", "replicate", "slice", "instruction", "output"], table=SFT_DATA),
            **figures,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=CHECK_NAME,
                passed=not problems,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={**figures, "problems": "; ".join(problems) or "none"},
            )
        ],
    )


def _kept_pairs_by_arm(warehouse: Warehouse) -> tuple[dict[str, list[dict]], list[str]]:
    """({arm: its kept pairs as rows, with reward and replicate}, arms without kept pairs). The arms
    that share the instruction pool must come from the same one."""
    arms, missing, pools = {}, [], {}
    for arm, (table, shares) in ARM_PAIRS.items():
        df = warehouse.read_table(table)
        if shares and df is not None:
            pools[arm] = df["pool"][0] if "pool" in df.columns and df.height else None
        kept = df.filter(pl.col("keep")) if df is not None else None
        if kept is None or kept.height == 0:
            missing.append(arm)
            continue
        # The training reward goes along (TeaMs-RL's answers have none), for the audit to set beside it.
        reward = pl.col("reward").cast(pl.Float64) if "reward" in kept.columns else pl.lit(None, pl.Float64)
        replicate = pl.col("replicate").fill_null(0) if "replicate" in kept.columns else pl.lit(None, pl.Int64)
        arms[arm] = kept.select(*_PAIR_COLUMNS, reward.alias("reward"), replicate.alias("replicate")).to_dicts()
    if len(set(pools.values())) > 1:
        made = ", ".join(f"{ARM_PAIRS[a][0]}: {p!r}" for a, p in pools.items())
        raise dg.Failure(
            f"the arms were made from different instruction pools ({made}): materialize them again for one pool"
        )
    return arms, missing


def _draw_replicates(
    arms: dict[str, list[dict]], replicates: list[int], config: MatchedDataConfig
) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """The matched draw of every replicate: (drawn pair rows, per-arm rows, problems, arms drawn short)."""
    sharing = {a for a, (_, shares) in ARM_PAIRS.items() if shares}
    rows, per_arm, problems, short = [], [], [], []
    for rep in replicates:
        present = {a: [r for r in rs if r["replicate"] in (rep, None)] for a, rs in arms.items()}
        lacking = [a for a, rs in present.items() if not rs]
        problems += [f"{a} has no kept pairs in replicate {rep}" for a in lacking]
        draws = draw_matched({a: rs for a, rs in present.items() if rs}, sharing, config)
        rows += _drawn_rows(rep, draws)
        per_arm += _per_arm_rows(rep, draws)
        short += [d.arm for d in draws.values() if d.short]
        problems += [
            f"{d.arm} has {len(d.train)} train / {len(d.validation)} validation pairs of "
            f"{d.target_train} / {d.target_validation} in replicate {rep}"
            for d in draws.values()
            if d.short
        ]
    return rows, per_arm, problems, short


def _drawn_rows(rep: int, draws: dict[str, ArmDraw]) -> list[dict]:
    """One row per pair in one replicate's draws: branch, replicate, slice, the pair, its table and rank."""
    return [
        dict(
            branch=arm,
            replicate=rep,
            slice=part,
            **{k: v for k, v in pair.items() if k != "replicate"},
            source_table=ARM_PAIRS[arm][0],
            draw_rank=k,
        )
        for arm, d in draws.items()
        for part, pairs in (("train", d.train), ("validation", d.validation))
        for k, pair in enumerate(pairs)
    ]


def _per_arm_rows(rep: int, draws: dict[str, ArmDraw]) -> list[dict]:
    """One row per arm in one replicate's draws: its kept, drawn and target counts."""
    return [
        dict(
            branch=d.arm,
            replicate=rep,
            kept_pairs=d.kept_pairs,
            train_pairs=len(d.train),
            validation_pairs=len(d.validation),
            target_train=d.target_train,
            target_validation=d.target_validation,
            shared_train_instructions=d.shared_train_instructions,
        )
        for d in draws.values()
    ]


def _draw_figures(per_arm: list[dict], replicates: list[int], short: list[str], missing: list[str]) -> dict:
    """The draw's figures for the asset and its check: per-arm counts, arms short or missing, pairs per arm."""
    first = [r for r in per_arm if r["replicate"] == replicates[0]]
    return {
        "per_arm": metadata_table(pl.DataFrame(per_arm), table=f"{SFT_DATA}/per_arm"),
        "arms_short": ", ".join(sorted(set(short))) or "none",
        "arms_missing": ", ".join(missing) or "none",
        "replicates": len(replicates),
        "train_pairs_per_arm": int(first[0]["target_train"]),
        "validation_pairs_per_arm": int(first[0]["target_validation"]),
    }


def recorded_sft_settings(drawn: pl.DataFrame) -> SFTSettings:
    """The SFT settings sft_training_pairs recorded with its draw (its config's `sft` section)."""
    recorded = json.loads(drawn["settings"][0]) if "settings" in drawn.columns and drawn.height else {}
    if "sft" not in recorded:
        raise dg.Failure(
            f"{SFT_DATA} (run {drawn['run_id'][0] if drawn.height else '?'}) records no SFT settings: "
            f"materialize {SFT_DATA} again (its config's `sft` section sets every arm's SFT)"
        )
    return SFTSettings(**recorded["sft"])


def build_finetuned_model_asset(name: str, arm: str, description: str) -> dg.AssetsDefinition:
    """The asset `name`: LoRA SFT of the base model on `arm`'s draw in sft_training_pairs."""
    pairs_table = ARM_PAIRS[arm][0]

    @dg.asset(
        name=name,
        group_name=ARM_GROUPS[arm],
        kinds={"duckdb", "pytorch"},
        deps=[SFT_DATA],
        pool="gpu",
        description=description,
    )
    def _finetuned_model(
        context: dg.AssetExecutionContext,
        warehouse: Warehouse,
        language_model: LanguageModelResource,
        artifact_store: ArtifactStore,
        training_launcher: TrainingLauncherResource,
    ) -> dg.MaterializeResult:
        drawn = warehouse.read_table(SFT_DATA)
        drawn = drawn.filter(pl.col("branch") == arm) if drawn is not None else None
        if drawn is None or drawn.filter(pl.col("slice") == "train").height == 0:
            raise dg.Failure(
                f"{SFT_DATA} has no training pairs for {arm}: materialize {pairs_table} and {SFT_DATA} first"
            )
        config = recorded_sft_settings(drawn)
        replicates = sorted(drawn["replicate"].unique().to_list()) if "replicate" in drawn.columns else [0]
        started = time.monotonic()
        frames, adapters, warnings = [], {}, []
        for rep in replicates:
            part = drawn.filter(pl.col("replicate") == rep) if "replicate" in drawn.columns else drawn
            frame, adapter, warning = _train_replicate(
                context, name, arm, rep, part, config, language_model, artifact_store, training_launcher
            )
            frames.append(frame)
            adapters[str(rep)] = adapter
            if warning:
                warnings.append(f"replicate {rep}: {warning}")
                context.log.warning(f"{name} replicate {rep}: {warning}")
        seconds = time.monotonic() - started
        df = pl.concat(frames, how="diagonal_relaxed")
        warehouse.write_table(name, df)
        return dg.MaterializeResult(
            metadata={
                **_finetuned_metadata(name, df, replicates, adapters, warnings, seconds),
                **peak_memory(language_model.resolved_device()),
            }
        )

    return _finetuned_model


def _finetuned_metadata(
    name: str, df: pl.DataFrame, replicates: list[int], adapters: dict[str, str], warnings: list[str], seconds: float
) -> dict:
    """A fine-tuned model's metadata: the epoch log, the adapters, and the first replicate's loss curve and figures."""
    first = df.filter(pl.col("replicate") == replicates[0])
    head, last = first.row(0, named=True), first.row(-1, named=True)
    return {
        **table_metadata(df, ["replicate", "epoch", "steps", "train_loss", "validation_loss"], table=name),
        # For the UI: the first replicate's adapter and every replicate's (the evaluation reads the table).
        "adapter_path": dg.MetadataValue.path(adapters[str(replicates[0])]),
        "adapter_paths": dg.MetadataValue.json(adapters),
        "replicates": len(replicates),
        "loss_curve": png_markdown(
            line_chart_png(
                first["epoch"].to_list(),
                {
                    "train_loss": first["train_loss"].to_list(),
                    "validation_loss": first["validation_loss"].to_list(),
                },
                f"SFT loss per epoch ({name}, replicate {replicates[0]})",
                xlabel="epoch",
            ),
            "SFT loss",
        ),
        "train_examples": int(head["train_examples"]),
        "validation_examples": int(head["validation_examples"]),
        "optimizer_steps": int(last["steps"]),
        "first_train_loss": head["train_loss"],
        "final_train_loss": last["train_loss"],
        "first_validation_loss": head["validation_loss"],
        "final_validation_loss": last["validation_loss"],
        "best_validation_loss": float(first["validation_loss"].min()) if head["validation_examples"] else float("nan"),
        "validation_warning": "; ".join(warnings) or "none",
        "resumed_from_step": dg.MetadataValue.json(
            {str(r): int(df.filter(pl.col("replicate") == r)["resumed_from_step"][0]) for r in replicates}
        ),
        "train_seconds": round(seconds, 1),
    }


def _train_replicate(
    context: dg.AssetExecutionContext,
    name: str,
    arm: str,
    rep: int,
    drawn: pl.DataFrame,
    config: SFTSettings,
    language_model: LanguageModelResource,
    artifact_store: ArtifactStore,
    training_launcher: TrainingLauncherResource,
) -> tuple[pl.DataFrame, str, str | None]:
    """SFT of a fresh copy of the base model on one replicate's draw (its own trainer seed): the
    epoch log, the adapter folder and a warning when the validation loss never improved."""
    train = drawn.filter(pl.col("slice") == "train").sort("draw_rank")
    val = drawn.filter(pl.col("slice") == "validation").sort("draw_rank")
    if train.height == 0:
        raise dg.Failure(
            f"{SFT_DATA} has no training pairs for {arm} in replicate {rep}: its kept pairs are all in "
            "the validation slice or missing; generate more instances or lower validation_share"
        )
    held = set(val["instruction_id"].to_list())
    settings = SFTSettings(**{**config.model_dump(), "seed": config.seed + rep})
    source, device = language_model.source(), language_model.resolved_device()
    out_dir = artifact_store.run_dir(name, context.run_id) / (f"replicate-{rep}" if rep else "")

    def on_log(step, total, logs):
        if "loss" in logs:
            context.log.info(f"{name} SFT step {step}/{total}: loss {logs['loss']:.3f}")
        elif "eval_loss" in logs:
            context.log.info(f"{name} epoch {logs.get('epoch', 0):.1f}: validation loss {logs['eval_loss']:.3f}")

    context.log.info(
        f"{name} replicate {rep}: SFT on {train.height} pairs, {val.height} pairs of {len(held)} "
        f"instructions held out for validation ({SFT_DATA}, branch {arm})"
    )
    checkpoints = training_checkpoints(
        context,
        artifact_store,
        name,
        settings.checkpoint_every_steps,
        settings=settings.model_dump(exclude={"checkpoint_every_steps"}),
        train=_triples(train),
        validation=_triples(val),
        model=source.model_id,
    )
    if training_launcher.distributed:
        result = _finetune_distributed(
            context, training_launcher, language_model, settings, train, val, out_dir, checkpoints
        )
    else:
        model, tokenizer, source, device = language_model.load()
        result = finetune(
            model, tokenizer, _triples(train), settings, out_dir, device, on_log, _triples(val), checkpoints
        )
        del model
    df = pl.DataFrame(result.epochs, schema_overrides={"step_losses": pl.List(pl.Float64)}).with_columns(
        pl.lit(rep).alias("replicate"),
        pl.lit(context.run_id).alias("run_id"),
        pl.lit(str(result.adapter_dir)).alias("adapter_path"),
        pl.lit(source.model_id).alias("base_model_id"),
        pl.lit(train.height).alias("train_examples"),
        pl.lit(val.height).alias("validation_examples"),
        pl.lit(ARM_PAIRS[arm][0]).alias("train_table"),
        pl.lit(arm).alias("branch"),
        pl.lit(json.dumps(settings.model_dump())).alias("settings"),
        pl.lit(json.dumps(sorted(held))).alias("validation_instruction_ids"),
        # A re-run of a killed step went on from this checkpoint step (0: trained from the start).
        pl.lit(result.resumed_from_step).alias("resumed_from_step"),
        pl.lit(result.world_size).alias("training_processes"),
    )
    warning = None
    if val.height == 0:
        warning = "no validation pairs (too few kept pairs): the curve shows the training loss only"
    elif validation_never_improved(result.epochs):
        warning = (
            "the validation loss never fell below its value before training "
            f"({result.epochs[0]['validation_loss']:.3f}): "
            "the adapter did not learn anything that carries over; check the pairs or the settings"
        )
    return df, str(result.adapter_dir), warning


def _finetune_distributed(
    context: dg.AssetExecutionContext,
    training_launcher: TrainingLauncherResource,
    language_model: LanguageModelResource,
    settings: SFTSettings,
    train: pl.DataFrame,
    val: pl.DataFrame,
    out_dir: Path,
    checkpoints,
) -> SFTResult:
    """SFT as torchrun processes (training_launcher), each loading the base model."""
    spec = {
        **training_spec("sft", language_model, settings.model_dump(), out_dir, checkpoints),
        "train": _triples(train),
        "validation": _triples(val),
    }
    done = training_launcher.train(context, spec, out_dir / "torchrun", language_model.resolved_device())
    return SFTResult(
        Path(done["adapter_dir"]),
        done["log"],
        done["epochs"],
        done["resumed_from_step"],
        done["steps_taken"],
        done["world_size"],
    )


def _triples(pairs: pl.DataFrame) -> list[tuple[str, str, str]]:
    return list(zip(pairs["instruction"].to_list(), pairs["input"].to_list(), pairs["output"].to_list()))


finetuned_model = build_finetuned_model_asset(
    FINETUNED,
    "refine_af",
    description="REFINE-AF: the base model fine-tuned with TRL's SFTTrainer and LoRA on its draw of the kept "
    "(instruction, input, output) triples the RL-refined policy wrote (sft_training_pairs, arm refine_af), in "
    "an Alpaca-style layout. The adapter goes to "
    "the artifact store; the loss log is this asset's table.",
)

selfinstruct_finetuned_model = build_finetuned_model_asset(
    SELFINSTRUCT_FINETUNED,
    "self_instruct",
    description="The Self-Instruct baseline: the same SFT of the base model on its equal-sized draw of the "
    "kept triples the base model wrote (sft_training_pairs, arm self_instruct), with the same settings as "
    "finetuned_model.",
)

teams_finetuned_model = build_finetuned_model_asset(
    TEAMS_FINETUNED,
    "teams_rl",
    description="TeaMs-RL: the same SFT of the base model on its equal-sized draw of the kept "
    "(evolved instruction, expert answer) pairs (sft_training_pairs, arm teams_rl), with the same settings as "
    "finetuned_model.",
)

bestofn_finetuned_model = build_finetuned_model_asset(
    BESTOFN_FINETUNED,
    "best_of_n",
    description="The best-of-N control: the same SFT of the base model on its equal-sized draw of the kept triples "
    "chosen by the training reward from the base model's candidates (sft_training_pairs, arm best_of_n), "
    "with the same settings as finetuned_model.",
)
