"""The audit of each arm's training data by a judge the RL policy never trained against."""

import dagster as dg
import numpy as np
import polars as pl

from refine_af_pipeline.evaluation.verdict import crossed_bootstrap, difference_table
from refine_af_pipeline.feedback.audit import InstructionPMIAudit
from refine_af_pipeline.llm.query_count import QueryCounter
from resources import LanguageModelResource, Warehouse

from .metadata import metadata_table, peak_memory, table_metadata

AUDIT = "training_data_audit"
# Arms on the shared instruction pool, compared instruction by instruction.
BOOTSTRAP_RESAMPLES = 10_000  # over replicates and instructions, fixed seed 0
AUDIT_COMPARISONS = [("refine_af", "self_instruct"), ("refine_af", "best_of_n"), ("best_of_n", "self_instruct")]


@dg.asset(name=AUDIT, group_name="finetune", kinds={"duckdb", "pytorch"}, deps=["sft_training_pairs"], pool="gpu")
def training_data_audit(
    context: dg.AssetExecutionContext, warehouse: Warehouse, audit_model: LanguageModelResource
) -> dg.MaterializeResult:
    """Every arm's training pairs (sft_training_pairs, slice train) scored by the audit judge
    (Gemma 3 270M by default: the pointwise mutual information of the output with the instruction,
    refine_af_pipeline/feedback/audit.py), beside the training reward they were selected with. The
    metadata compares the arms that share the instruction pool on the instructions both trained
    on, with a bootstrap CI over instructions: did RL's data get better by a judge it was not
    trained on?"""
    drawn = warehouse.read_table("sft_training_pairs")
    if drawn is None or drawn.filter(pl.col("slice") == "train").height == 0:
        raise dg.Failure("sft_training_pairs has no training pairs: materialize it first")
    train = drawn.filter(pl.col("slice") == "train")
    queries = QueryCounter()
    judge = InstructionPMIAudit(
        queries.wrap(audit_model.open_models({"audit": None})["audit"], "audit"), audit_model.scoring_batch_size
    )
    scores = judge.score(train["instruction"].to_list(), train["input"].to_list(), train["output"].to_list())
    df = train.select(
        "branch", "replicate", "instance_id", "instruction_id", "instruction", "input", "output", "reward"
    ).with_columns(
        pl.Series("audit", scores, dtype=pl.Float64),
        pl.lit(judge.version).alias("audit_judge"),
        pl.lit(context.run_id).alias("run_id"),
    )
    warehouse.write_table(AUDIT, df)
    per_arm = (
        df.group_by("branch")
        .agg(
            pl.len().alias("train_pairs"),
            pl.col("audit").mean().alias("mean_audit"),
            pl.col("reward").mean().alias("mean_training_reward"),
        )
        .sort("branch")
    )
    per_instruction = df.group_by("branch", "replicate", "instruction_id").agg(pl.col("audit").mean()).to_dicts()
    comparisons = []
    for candidate, reference in AUDIT_COMPARISONS:
        table = difference_table(
            per_instruction, candidate, reference, "audit", model_key="branch", item_key="instruction_id"
        )
        if np.isnan(table).all():  # no instruction both arms trained on
            continue
        mean, low, high, _ = crossed_bootstrap(table, BOOTSTRAP_RESAMPLES)
        comparisons.append(
            dict(
                candidate=candidate,
                reference=reference,
                paired_instructions=int((~np.isnan(table)).any(axis=0).sum()),
                mean_audit_difference=mean,
                ci95_low=low,
                ci95_high=high,
            )
        )
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["branch", "instruction", "output", "reward", "audit"]),
            "audit_judge": judge.version,
            "per_arm": metadata_table(per_arm),
            "comparisons": metadata_table(pl.DataFrame(comparisons)) if comparisons else "no shared instructions",
            "llm_queries": queries.as_json(),
            **peak_memory(audit_model.resolved_device()),
        }
    )
