"""Stage 4: supervised fine-tuning of the base model on kept instruction/input/output triples. One
factory builds the REFINE-AF model (on instance_output_pairs) and the Self-Instruct baseline (on
selfinstruct_instance_pairs) with the same config class and defaults."""


import json
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.plots import line_chart_png
from refine_af_pipeline.sft_training import SFTSettings, finetune
from resources import ArtifactStore, LanguageModelResource, Warehouse

from .config_types import PositiveFloat, PositiveInt
from .metadata import png_markdown, table_metadata


class FinetuneConfig(dg.Config):
    # Both branches read their own copy of this config: keep them equal for a fair comparison.
    epochs: PositiveFloat = 2.0
    batch_size: PositiveInt = 8
    learning_rate: PositiveFloat = 2e-4
    max_length: PositiveInt = 256
    lora_r: PositiveInt = 8
    lora_alpha: PositiveInt = 16
    seed: int = 0


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
        triples = list(zip(kept["instruction"].to_list(), kept["input"].to_list(), kept["output"].to_list()))
        model, tokenizer, source, device = language_model.load()
        out_dir = artifact_store.run_dir(name, context.run_id)
        started = time.monotonic()

        def on_log(step, total, logs):
            if "loss" in logs:
                context.log.info(f"{name} SFT step {step}/{total}: loss {logs['loss']:.3f}")

        result = finetune(model, tokenizer, triples, SFTSettings(**config.model_dump()), out_dir, device, on_log)
        df = pl.DataFrame(result.log).with_columns(
            pl.lit(context.run_id).alias("run_id"), pl.lit(str(result.adapter_dir)).alias("adapter_path"),
            pl.lit(source.model_id).alias("base_model_id"), pl.lit(len(triples)).alias("train_examples"),
            pl.lit(pairs_table).alias("train_table"), pl.lit(json.dumps(config.model_dump())).alias("settings"),
        )
        warehouse.write_table(name, df)
        return dg.MaterializeResult(metadata={
            **table_metadata(df, ["step", "loss", "learning_rate"]),
            "adapter_path": dg.MetadataValue.path(str(result.adapter_dir)),
            "loss_curve": png_markdown(line_chart_png(df["step"].to_list(), {"loss": df["loss"].to_list()},
                                                      f"SFT loss ({name})"), "SFT loss"),
            "train_examples": len(triples),
            "first_loss": float(df["loss"][0]),
            "final_loss": float(df["loss"][-1]),
            "train_seconds": round(time.monotonic() - started, 1),
        })

    return _finetuned_model


finetuned_model = build_finetuned_model_asset(
    "finetuned_model", "instance_output_pairs",
    description="REFINE-AF: the base model fine-tuned with TRL's SFTTrainer and LoRA on the kept (instruction, "
                "input, output) triples the RL-refined policy wrote, in an Alpaca-style layout. The adapter goes to "
                "the artifact store; the loss log is this asset's table.")

selfinstruct_finetuned_model = build_finetuned_model_asset(
    "selfinstruct_finetuned_model", "selfinstruct_instance_pairs",
    description="The Self-Instruct baseline: the same SFT of the base model on the kept triples the base model "
                "wrote (selfinstruct_instance_pairs), with the same settings as finetuned_model.")
