"""Stage 3: instances for every kept instruction, written by the RL-refined policy (REFINE-AF) or,
in the Self-Instruct baseline branch, by the base model. One factory builds both assets, so the two
branches differ only in which policy writes the instances."""


import json

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback import COMPONENTS
from refine_af_pipeline.generation import SamplingParams
from refine_af_pipeline.instances import filter_reason, generate_scored_instances
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse

from .metadata import progress_logger, table_metadata
from .shared import base_component_stats, kept_instructions, latest_artifact, subset


class InstancePairsConfig(dg.Config):
    # 0 = every kept instruction. 16 for the demo: with 32 bootstrap prompts the pool holds ~25-30,
    # and 24 pairs made SFT and this step ~1 min slower than the 15-minute make-run budget allows.
    # The same seed picks the same instructions in both branches.
    max_instructions: int = 16
    instances_per_instruction: int = 1
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


def build_instance_pairs_asset(name: str, use_rl_policy: bool, description: str) -> dg.AssetsDefinition:
    """The asset `name`: the RL-refined policy's instances (`use_rl_policy`) or the base model's."""
    deps = ["reward_scores", "deduplicated_instructions"] + (["rl_refined_policy"] if use_rl_policy else [])

    @dg.asset(name=name, group_name="instances", kinds={"duckdb", "pytorch"}, deps=deps, pool="gpu",
              description=description)
    def _instance_pairs(context: dg.AssetExecutionContext, config: InstancePairsConfig, warehouse: Warehouse,
                        language_model: LanguageModelResource,
                        feedback_scorer: FeedbackScorerResource) -> dg.MaterializeResult:
        chosen = subset(kept_instructions(warehouse), config.max_instructions, config.seed)
        adapter = latest_artifact(warehouse, "rl_refined_policy") if use_rl_policy else None
        stats = base_component_stats(warehouse)
        policy, tokenizer, source, device = language_model.load(adapter=adapter)
        # The judge is always the plain base model; when the base model is also the policy, one copy
        # serves both (generation does not change the weights).
        judge, judge_tokenizer = language_model.load()[:2] if use_rl_policy else (policy, tokenizer)
        scorer = feedback_scorer.build(judge, judge_tokenizer, device, stats, language_model.batch_size,
                                       judge_id=source.model_id)
        versions = scorer.versions()
        ids = [i for i in chosen["instruction_id"].to_list() for _ in range(config.instances_per_instruction)]
        instructions = [i for i in chosen["instruction"].to_list() for _ in range(config.instances_per_instruction)]
        params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p, do_sample=True)
        rows = generate_scored_instances(policy, tokenizer, scorer, instructions, params, language_model.batch_size,
                                         config.seed, progress_logger(context, name,
                                                                      language_model.batch_size * config.max_new_tokens))
        reasons = filter_reason(rows)
        df = pl.DataFrame(
            [dict(instance_id=f"{iid}-{k % config.instances_per_instruction}", instruction_id=iid, **r,
                  keep=reason is None, filter_reason=reason, policy_adapter=adapter, model_id=source.model_id,
                  scorers=json.dumps(versions), **{f"{c}_scorer": versions[c] for c in COMPONENTS},
                  sampling_params=json.dumps(params.as_dict()), run_id=context.run_id)
             for k, (iid, r, reason) in enumerate(zip(ids, rows, reasons))],
            schema_overrides={c: pl.Float64 for c in COMPONENTS}
            | {"gate_reason": pl.Utf8, "filter_reason": pl.Utf8, "policy_adapter": pl.Utf8},
        )
        warehouse.write_table(name, df)
        return dg.MaterializeResult(metadata={
            **table_metadata(df, ["instruction", "input", "output", "reward", "keep"]),
            "parse_rate": float((df["parse_status"] == "ok").mean()),
            "kept_pairs": int(df["keep"].sum()),
            "mean_reward": float(df["reward"].mean()),
            "policy": dg.MetadataValue.path(adapter) if adapter else "base model (no RL adapter)",
        })

    return _instance_pairs


instance_output_pairs = build_instance_pairs_asset(
    "instance_output_pairs", use_rl_policy=True,
    description="REFINE-AF: the RL-refined policy writes input/output instances for the kept instructions; each "
                "is parsed, scored by the same automated feedback, and filtered (unparseable, empty output, output "
                "equal to input, one input with conflicting outputs). `keep` marks the rows used for SFT.")

selfinstruct_instance_pairs = build_instance_pairs_asset(
    "selfinstruct_instance_pairs", use_rl_policy=False,
    description="The Self-Instruct baseline (no RL): the base model writes the instances for the same kept "
                "instructions, with the same prompts, sampling, scoring and filters as instance_output_pairs; "
                "policy_adapter is null.")
