"""Stage 4: supervised fine-tuning of the base model on kept instruction/input/output triples. One
factory builds the REFINE-AF model (on instance_output_pairs) and the Self-Instruct baseline (on
selfinstruct_instance_pairs) with the same config class and defaults."""


import json
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.plots import line_chart_png
from refine_af_pipeline.training.sft import SFTSettings, finetune, validation_never_improved, validation_split
from resources import ArtifactStore, LanguageModelResource, Warehouse

from .metadata import peak_memory, png_markdown, table_metadata


class FinetuneConfig(dg.Config, SFTSettings):
    """Run config of both fine-tuning assets: the fields of SFTSettings (refine_af_pipeline/training/sft.py)."""


def build_finetuned_model_asset(name: str, pairs_table: str, description: str) -> dg.AssetsDefinition:
    """The asset `name`: LoRA SFT of the base model on the kept rows of `pairs_table`."""

    @dg.asset(name=name, group_name="finetune", kinds={"duckdb", "pytorch"}, deps=[pairs_table], pool="gpu",
              description=description)
    def _finetuned_model(context: dg.AssetExecutionContext, config: FinetuneConfig, warehouse: Warehouse,
                         language_model: LanguageModelResource, artifact_store: ArtifactStore) -> dg.MaterializeResult:
        pairs = warehouse.read_table(pairs_table)
        if pairs is None or pairs.filter(pl.col("keep")).height == 0:
            raise dg.Failure(f"{pairs_table} has no kept pairs to fine-tune on")
        kept = pairs.filter(pl.col("keep"))
        held = validation_split(kept["instruction_id"].to_list(), config.validation_share, config.min_validation)
        is_val = kept["instruction_id"].is_in(list(held))
        train, val = kept.filter(~is_val), kept.filter(is_val)
        if train.height == 0:
            raise dg.Failure(f"every kept pair of {pairs_table} is in the validation slice; lower validation_share")
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
                         "held out for validation")
        result = finetune(model, tokenizer, triples, config, out_dir, device, on_log, validation=_triples(val))
        seconds = time.monotonic() - started
        df = pl.DataFrame(result.epochs, schema_overrides={"step_losses": pl.List(pl.Float64)}).with_columns(
            pl.lit(context.run_id).alias("run_id"), pl.lit(str(result.adapter_dir)).alias("adapter_path"),
            pl.lit(source.model_id).alias("base_model_id"), pl.lit(train.height).alias("train_examples"),
            pl.lit(val.height).alias("validation_examples"), pl.lit(pairs_table).alias("train_table"),
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
    "finetuned_model", "instance_output_pairs",
    description="REFINE-AF: the base model fine-tuned with TRL's SFTTrainer and LoRA on the kept (instruction, "
                "input, output) triples the RL-refined policy wrote, in an Alpaca-style layout. The adapter goes to "
                "the artifact store; the loss log is this asset's table.")

selfinstruct_finetuned_model = build_finetuned_model_asset(
    "selfinstruct_finetuned_model", "selfinstruct_instance_pairs",
    description="The Self-Instruct baseline: the same SFT of the base model on the kept triples the base model "
                "wrote (selfinstruct_instance_pairs), with the same settings as finetuned_model.")

teams_finetuned_model = build_finetuned_model_asset(
    "teams_finetuned_model", "teams_instruction_pairs",
    description="TeaMs-RL: the same SFT of the base model on the kept (evolved instruction, expert answer) pairs "
                "(teams_instruction_pairs), with the same settings as finetuned_model.")
