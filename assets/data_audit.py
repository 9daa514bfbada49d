"""The audit of each arm's training data by a judge the RL policy never trained against."""

import dagster as dg
import numpy as np
import polars as pl

from refine_af_pipeline.evaluation.verdict import crossed_bootstrap, difference_table
from refine_af_pipeline.feedback.audit import InstructionPMIAudit
from refine_af_pipeline.llm.query_count import QueryCounter
from resources import LanguageModelResource, Warehouse

from . import groups
from .columns import declare
from .finetune import SFT_DATA
from .metadata import metadata_table, peak_memory, table_metadata

AUDIT = "training_data_audit"
COLUMNS = declare(
    {
        AUDIT: {
            "reward": "the pair's training reward, as in sft_training_pairs (null for TeaMs-RL: its answers are not "
            "scored)",
            "audit": "the audit judge's score: mean per-token log-probability gain of the output from the "
            "instruction, given the input (PMI, nats/token; higher = the output answers this instruction)",
            "audit_judge": "the audit judge: method and model",
        },
        f"{AUDIT}/per_arm": {
            "train_pairs": "training pairs of the branch, over its replicates",
            "mean_audit": "mean audit score over the branch's training pairs",
            "mean_training_reward": "mean training reward of the branch's training pairs (null for TeaMs-RL: its "
            "answers are not scored)",
        },
        f"{AUDIT}/comparisons": {
            "candidate": "branch compared (the first of the pair)",
            "reference": "branch it is compared with",
            "paired_instructions": "distinct instructions both branches trained on in some replicate (the "
            "comparison's items)",
            "mean_audit_difference": "mean over paired instructions of candidate minus reference audit score",
            "ci95_low": "lower end of its 95% bootstrap CI (replicates and instructions resampled together)",
            "ci95_high": "upper end of its 95% bootstrap CI",
        },
    }
)
# Arms on the shared instruction pool, compared instruction by instruction.
BOOTSTRAP_RESAMPLES = 10_000  # over replicates and instructions, fixed seed 0
AUDIT_COMPARISONS = [("refine_af", "self_instruct"), ("refine_af", "best_of_n"), ("best_of_n", "self_instruct")]


@dg.asset(name=AUDIT, group_name=groups.EVALUATION, kinds={"duckdb", "pytorch"}, deps=[SFT_DATA], pool="gpu")
def training_data_audit(
    context: dg.AssetExecutionContext, warehouse: Warehouse, audit_model: LanguageModelResource
) -> dg.MaterializeResult:
    """Every arm's training pairs (sft_training_pairs, slice train) scored by the audit judge
    (Gemma 3 270M by default: the pointwise mutual information of the output with the instruction,
    refine_af_pipeline/feedback/audit.py), beside the training reward they were selected with. The
    metadata compares the arms that share the instruction pool on the instructions both trained
    on, with a bootstrap CI over instructions: did RL's data get better by a judge it was not
    trained on?"""
    drawn = warehouse.read_table(SFT_DATA)
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
        # This run's model queries, for the query ledger.
        pl.lit(queries.as_json()).alias("llm_queries"),
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
            **table_metadata(df, ["branch", "instruction", "output", "reward", "audit"], table=AUDIT),
            "audit_judge": judge.version,
            "per_arm": metadata_table(per_arm, table=f"{AUDIT}/per_arm"),
            "comparisons": metadata_table(pl.DataFrame(comparisons), table=f"{AUDIT}/comparisons")
            if comparisons
            else "no shared instructions",
            "llm_queries": queries.as_json(),
            **peak_memory(audit_model.resolved_device()),
        }
    )
