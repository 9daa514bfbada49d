"""Stage 4: supervised fine-tuning of the base model on kept instruction/input/output triples.

`sft_training_pairs` draws the same number of training and validation pairs from every arm's kept
pairs (refine_af_pipeline/training/matched_data.py); one factory builds each arm's fine-tuned model
on its draw, with the same config class and defaults."""


import json
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.plots import line_chart_png
from refine_af_pipeline.training.matched_data import MatchedDataSettings, draw_matched
from refine_af_pipeline.training.sft import SFTSettings, finetune, validation_never_improved
from resources import ArtifactStore, LanguageModelResource, Warehouse

from .metadata import metadata_table, peak_memory, png_markdown, table_metadata

SFT_DATA = "sft_training_pairs"
# arm -> (its kept pairs, whether it writes instances for the shared pool of kept instructions)
ARM_PAIRS = {"refine_af": ("instance_output_pairs", True), "self_instruct": ("selfinstruct_instance_pairs", True),
             "best_of_n": ("bestofn_instance_pairs", True), "teams_rl": ("teams_instruction_pairs", False)}
_PAIR_COLUMNS = ("instance_id", "instruction_id", "instruction", "input", "output")
CHECK_NAME = "every_arm_has_its_pairs"


class MatchedDataConfig(dg.Config, MatchedDataSettings):
    """Run config of `sft_training_pairs`: the fields of MatchedDataSettings (refine_af_pipeline/training/matched_data.py)."""


@dg.asset(name=SFT_DATA, group_name="finetune", kinds={"duckdb"}, deps=[t for t, _ in ARM_PAIRS.values()],
          check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset=SFT_DATA, description=(
              "Warns when an arm has fewer training or validation pairs than the others get, or is missing: "
              "its fine-tuned model is then compared on less data."))])
def sft_training_pairs(context: dg.AssetExecutionContext, config: MatchedDataConfig,
                       warehouse: Warehouse) -> dg.MaterializeResult:
    """The pairs each arm's SFT trains and validates on: the same number for every arm (`sft_pairs`,
    or the smallest arm's count), drawn by a stable hash; REFINE-AF, Self-Instruct (and any arm on
    the same instruction pool) train on the same instructions as far as they all kept them. One row
    per drawn pair: branch, slice (train / validation), the pair, and the table it came from."""
    arms, missing = {}, []
    for arm, (table, _) in ARM_PAIRS.items():
        df = warehouse.read_table(table)
        kept = df.filter(pl.col("keep")) if df is not None else None
        if kept is None or kept.height == 0:
            missing.append(arm)
            continue
        # The training reward goes along (TeaMs-RL's answers have none), for the audit to set beside it.
        reward = pl.col("reward").cast(pl.Float64) if "reward" in kept.columns else pl.lit(None, pl.Float64)
        arms[arm] = kept.select(*_PAIR_COLUMNS, reward.alias("reward")).to_dicts()
    if not arms:
        raise dg.Failure(f"no arm has kept pairs: materialize {', '.join(t for t, _ in ARM_PAIRS.values())} first")
    draws = draw_matched(arms, {a for a, (_, shares) in ARM_PAIRS.items() if shares}, config)
    rows = [dict(branch=arm, slice=part, **pair, source_table=ARM_PAIRS[arm][0], draw_rank=k)
            for arm, d in draws.items() for part, pairs in (("train", d.train), ("validation", d.validation))
            for k, pair in enumerate(pairs)]
    df = pl.DataFrame(rows, schema_overrides={"reward": pl.Float64}).with_columns(
        pl.lit(json.dumps(config.model_dump())).alias("settings"),
                                         pl.lit(context.run_id).alias("run_id"))
    warehouse.write_table(SFT_DATA, df)
    per_arm = pl.DataFrame([dict(branch=d.arm, kept_pairs=d.kept_pairs, train_pairs=len(d.train),
                                 validation_pairs=len(d.validation), target_train=d.target_train,
                                 target_validation=d.target_validation,
                                 shared_train_instructions=d.shared_train_instructions) for d in draws.values()])
    short = [d.arm for d in draws.values() if d.short]
    problems = [f"{d.arm} has {len(d.train)} train / {len(d.validation)} validation pairs of "
                f"{d.target_train} / {d.target_validation}" for d in draws.values() if d.short]
    problems += [f"{arm} has no kept pairs in {ARM_PAIRS[arm][0]}" for arm in missing]
    for line in problems:
        context.log.warning(f"{SFT_DATA}: {line}: its model is compared on less data")
    figures = {"per_arm": metadata_table(per_arm), "arms_short": ", ".join(short) or "none",
               "arms_missing": ", ".join(missing) or "none",
               "train_pairs_per_arm": int(next(iter(draws.values())).target_train),
               "validation_pairs_per_arm": int(next(iter(draws.values())).target_validation)}
    return dg.MaterializeResult(
        metadata={**table_metadata(df, ["branch", "slice", "instruction", "output"]), **figures},
        check_results=[dg.AssetCheckResult(check_name=CHECK_NAME, passed=not problems,
                                           severity=dg.AssetCheckSeverity.WARN,
                                           metadata={**figures, "problems": "; ".join(problems) or "none"})])


class FinetuneConfig(dg.Config, SFTSettings):
    """Run config of both fine-tuning assets: the fields of SFTSettings (refine_af_pipeline/training/sft.py)."""


def build_finetuned_model_asset(name: str, arm: str, description: str) -> dg.AssetsDefinition:
    """The asset `name`: LoRA SFT of the base model on `arm`'s draw in sft_training_pairs."""
    pairs_table = ARM_PAIRS[arm][0]

    @dg.asset(name=name, group_name="finetune", kinds={"duckdb", "pytorch"}, deps=[SFT_DATA], pool="gpu",
              description=description)
    def _finetuned_model(context: dg.AssetExecutionContext, config: FinetuneConfig, warehouse: Warehouse,
                         language_model: LanguageModelResource, artifact_store: ArtifactStore) -> dg.MaterializeResult:
        drawn = warehouse.read_table(SFT_DATA)
        drawn = drawn.filter(pl.col("branch") == arm) if drawn is not None else None
        if drawn is None or drawn.filter(pl.col("slice") == "train").height == 0:
            raise dg.Failure(f"{SFT_DATA} has no training pairs for {arm}: materialize {pairs_table} and "
                             f"{SFT_DATA} first")
        train = drawn.filter(pl.col("slice") == "train").sort("draw_rank")
        val = drawn.filter(pl.col("slice") == "validation").sort("draw_rank")
        held = set(val["instruction_id"].to_list())
        triples = _triples(train)
        model, tokenizer, source, device = language_model.load()
        out_dir = artifact_store.run_dir(name, context.run_id)
        started = time.monotonic()

        def on_log(step, total, logs):
            if "loss" in logs:
                context.log.info(f"{name} SFT step {step}/{total}: loss {logs['loss']:.3f}")
            elif "eval_loss" in logs:
                context.log.info(f"{name} epoch {logs.get('epoch', 0):.1f}: validation loss {logs['eval_loss']:.3f}")

        context.log.info(f"{name}: SFT on {train.height} pairs, {val.height} pairs of {len(held)} instructions "
                         f"held out for validation ({SFT_DATA}, arm {arm})")
        result = finetune(model, tokenizer, triples, config, out_dir, device, on_log, validation=_triples(val))
        seconds = time.monotonic() - started
        df = pl.DataFrame(result.epochs, schema_overrides={"step_losses": pl.List(pl.Float64)}).with_columns(
            pl.lit(context.run_id).alias("run_id"), pl.lit(str(result.adapter_dir)).alias("adapter_path"),
            pl.lit(source.model_id).alias("base_model_id"), pl.lit(train.height).alias("train_examples"),
            pl.lit(val.height).alias("validation_examples"), pl.lit(pairs_table).alias("train_table"),
            pl.lit(arm).alias("branch"),
            pl.lit(json.dumps(config.model_dump())).alias("settings"),
            pl.lit(json.dumps(sorted(held))).alias("validation_instruction_ids"),
        )
        warehouse.write_table(name, df)
        first, last = df.row(0, named=True), df.row(-1, named=True)
        warning = None
        if val.height == 0:
            warning = "no validation pairs (too few kept pairs): the curve shows the training loss only"
        elif validation_never_improved(result.epochs):
            warning = (f"the validation loss never fell below its value before training ({first['validation_loss']:.3f}): "
                       "the adapter did not learn anything that carries over; check the pairs or the settings")
        if warning:
            context.log.warning(f"{name}: {warning}")
        return dg.MaterializeResult(metadata={
            **table_metadata(df, ["epoch", "steps", "train_loss", "validation_loss"]),
            "adapter_path": dg.MetadataValue.path(str(result.adapter_dir)),
            "loss_curve": png_markdown(line_chart_png(
                df["epoch"].to_list(), {"train_loss": df["train_loss"].to_list(),
                                        "validation_loss": df["validation_loss"].to_list()},
                f"SFT loss per epoch ({name})", xlabel="epoch"), "SFT loss"),
            "train_examples": train.height,
            "validation_examples": val.height,
            "optimizer_steps": int(last["steps"]),
            "first_train_loss": first["train_loss"],
            "final_train_loss": last["train_loss"],
            "first_validation_loss": first["validation_loss"],
            "final_validation_loss": last["validation_loss"],
            "best_validation_loss": float(df["validation_loss"].min()) if val.height else float("nan"),
            "validation_warning": warning or "none",
            "train_seconds": round(seconds, 1),
            **peak_memory(device),
        })

    return _finetuned_model


def _triples(pairs: pl.DataFrame) -> list[tuple[str, str, str]]:
    return list(zip(pairs["instruction"].to_list(), pairs["input"].to_list(), pairs["output"].to_list()))


finetuned_model = build_finetuned_model_asset(
    "finetuned_model", "refine_af",
    description="REFINE-AF: the base model fine-tuned with TRL's SFTTrainer and LoRA on its draw of the kept "
                "(instruction, input, output) triples the RL-refined policy wrote (sft_training_pairs, arm refine_af), in "
                "an Alpaca-style layout. The adapter goes to "
                "the artifact store; the loss log is this asset's table.")

selfinstruct_finetuned_model = build_finetuned_model_asset(
    "selfinstruct_finetuned_model", "self_instruct",
    description="The Self-Instruct baseline: the same SFT of the base model on its equal-sized draw of the "
                "kept triples the base model wrote (sft_training_pairs, arm self_instruct), with the same settings as "
                "finetuned_model.")

teams_finetuned_model = build_finetuned_model_asset(
    "teams_finetuned_model", "teams_rl",
    description="TeaMs-RL: the same SFT of the base model on its equal-sized draw of the kept "
                "(evolved instruction, expert answer) pairs (sft_training_pairs, arm teams_rl), with the same settings as "
                "finetuned_model.")

bestofn_finetuned_model = build_finetuned_model_asset(
    "bestofn_finetuned_model", "best_of_n",
    description="The best-of-N control: the same SFT of the base model on its equal-sized draw of the kept triples "
                "chosen by the training reward from the base model's candidates (sft_training_pairs, arm best_of_n), "
                "with the same settings as finetuned_model.")
