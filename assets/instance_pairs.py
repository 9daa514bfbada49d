"""Stage 3: instances for every kept instruction, written by the RL-refined policy (REFINE-AF), by
the base model (the Self-Instruct baseline), or by the base model N times keeping the candidate the
training reward likes best (the best-of-N control: what the reward buys without RL). One factory
builds the three assets, so the arms differ only in the policy and the number of candidates."""

import json
import time

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback.gates import GateSettings
from refine_af_pipeline.instructions.instances import (
    BestOfNSettings,
    InstancePairsSettings,
    choose_and_filter,
    generate_scored_instances,
)
from refine_af_pipeline.instructions.pools import UNNAMED_POOL
from refine_af_pipeline.llm.backend import SamplingParams
from refine_af_pipeline.llm.query_count import QueryCounter
from refine_af_pipeline.training.splits import sample_rows
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.batch_ledger import BatchLedger, GenerationPlan

from . import groups
from .columns import declare
from .instructions import current_pool, tag_run_with_pool
from .metadata import peak_memory, progress_logger, table_metadata
from .reward_model import REWARD_MODEL
from .rl_policy import RL_POLICY
from .shared import (
    POOL_DEPS,
    SCORED_INSTANCE_COLUMNS,
    STANDARDISATION,
    adapter_folder,
    base_component_stats,
    kept_instructions,
    learned_reward_dir,
    require_pool,
    scored_instance_frame,
)

INSTANCE_PAIRS = "instance_output_pairs"
SELFINSTRUCT_PAIRS = "selfinstruct_instance_pairs"
BESTOFN_PAIRS = "bestofn_instance_pairs"


class InstancePairsConfig(dg.Config, InstancePairsSettings):
    """Run config of the REFINE-AF and Self-Instruct instance stages: the fields of InstancePairsSettings
    (refine_af_pipeline/instructions/instances.py)."""


class BestOfNConfig(dg.Config, BestOfNSettings):
    """Run config of `bestofn_instance_pairs`: the fields of BestOfNSettings
    (refine_af_pipeline/instructions/instances.py)."""


def _plan(
    context: dg.AssetExecutionContext,
    name: str,
    config: InstancePairsSettings,
    warehouse: Warehouse,
    ledger: BatchLedger,
    adapter: str | None,
    batch_size: int,
    feedback_scorer: FeedbackScorerResource,
    reward_dir: str | None,
) -> GenerationPlan:
    """The plan a crashed run left for this policy, or a new one: the chosen instructions in batches."""
    # A plan made with another RL policy, number of candidates or replicates, learned reward or gate
    # is abandoned: rows generated or scored under different ones would not compare.
    wanted = {
        "adapter": adapter,
        "candidates_per_instance": getattr(config, "candidates_per_instance", 1),
        "replicates": config.replicates,
        "learned_reward": reward_dir,
        "gate": json.dumps({k: getattr(feedback_scorer, k) for k in GateSettings.model_fields}, sort_keys=True),
        "pool": current_pool(warehouse),
    }

    def stale(p) -> str | None:
        # A plan from before these settings.
        defaults = {"candidates_per_instance": 1, "replicates": 1, "pool": UNNAMED_POOL}
        differing = [k for k, v in wanted.items() if p.settings.get(k, defaults.get(k)) != v]
        return (
            f"made with other {', '.join(differing)} ({', '.join(str(p.settings.get(k)) for k in differing)})"
            if differing
            else None
        )

    plan = ledger.take_unfinished(context.run_id, context.log, stale, clear_rows_of=_staging(name))
    if plan is not None:
        return plan
    chosen = sample_rows(kept_instructions(warehouse, context), config.max_instructions, config.seed)
    n, candidates = config.instances_per_instruction, getattr(config, "candidates_per_instance", 1)
    items = [
        dict(
            instance_id=instance_id(iid, j, r),
            replicate=r,
            candidate_index=c,
            instruction_id=iid,
            instruction=text,
            is_classification=bool(cls),
        )
        for r in range(config.replicates)
        for iid, text, cls in zip(
            chosen["instruction_id"].to_list(), chosen["instruction"].to_list(), chosen["is_classification"].to_list()
        )
        for j in range(n)
        for c in range(candidates)
    ]
    settings = dict(config.sampling_params().as_dict(), seed=config.seed, batch_size=batch_size, **wanted)
    return ledger.start_plan(
        context.run_id, settings, [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    )


def instance_id(instruction_id: str, sample: int, replicate: int) -> str:
    """<instruction id>-<sample>, and -r<replicate> after it from the second replicate on."""
    return f"{instruction_id}-{sample}" + (f"-r{replicate}" if replicate else "")


def _staging(name: str) -> str:
    # Batches land here; the asset's own table is replaced with the whole plan once it is finished,
    # so readers of `name` never see a half-written run.
    return f"{name}_batches"


# Each instance stage's table and its staging table (the rows of finished batches, before the filters).
STAGING_TABLES = {name: _staging(name) for name in (INSTANCE_PAIRS, SELFINSTRUCT_PAIRS, BESTOFN_PAIRS)}
_STAGED_COLUMNS = {
    **SCORED_INSTANCE_COLUMNS,
    "candidate_index": "which of the instance's best-of-N candidates the row is (0 in the other branches: one "
    "candidate)",
    "run_id": "run that planned the batch (generation_plans; a run resuming the plan keeps its id)",
}
COLUMNS = declare(
    {
        **{staging: _STAGED_COLUMNS for staging in STAGING_TABLES.values()},
        **{
            name: {
                **_STAGED_COLUMNS,
                "chosen": "whether the row is its instance's chosen candidate (the highest training reward; always "
                "true with one candidate)",
                "keep": "whether the pair passed every filter and enters SFT's draw (sft_training_pairs)",
                "filter_reason": "why the pair was filtered out (a gate reason, conflicting_outputs_for_same_input, "
                "not_best_of_n for a candidate not chosen); null when kept",
            }
            for name in STAGING_TABLES
        },
    }
)


def build_instance_pairs_asset(
    name: str,
    group: str,
    use_rl_policy: bool,
    description: str,
    config_class: type[dg.Config] = InstancePairsConfig,
) -> dg.AssetsDefinition:
    """The asset `name`: the RL-refined policy's instances (`use_rl_policy`) or the base model's;
    with BestOfNConfig, the best of several candidates per instance by the training reward."""
    deps = [STANDARDISATION, *POOL_DEPS, REWARD_MODEL] + ([RL_POLICY] if use_rl_policy else [])

    @dg.asset(name=name, group_name=group, kinds={"duckdb", "pytorch"}, deps=deps, pool="gpu", description=description)
    def _instance_pairs(
        context: dg.AssetExecutionContext,
        config: config_class,
        warehouse: Warehouse,
        language_model: LanguageModelResource,
        feedback_scorer: FeedbackScorerResource,
    ) -> dg.MaterializeResult:
        ledger = BatchLedger(warehouse, name)
        # The RL policy's adapter, from rl_refined_policy's table (in this data folder).
        adapter = adapter_folder(warehouse, RL_POLICY) if use_rl_policy else None
        reward_dir = learned_reward_dir(warehouse, feedback_scorer)
        plan = _plan(
            context,
            name,
            config,
            warehouse,
            ledger,
            adapter,
            language_model.generation_batch_size(config.generation_batch_size),
            feedback_scorer,
            reward_dir,
        )
        settings = plan.settings
        # What the plan was made from: every table it reads must come from the same pool.
        pool = settings.get("pool", UNNAMED_POOL)
        tag_run_with_pool(context, pool)
        for upstream in [STANDARDISATION] + ([RL_POLICY] if use_rl_policy else []):
            require_pool(warehouse, upstream, pool)
        params = SamplingParams(
            settings["max_new_tokens"], settings["temperature"], settings["top_p"], settings["do_sample"]
        )
        pending = plan.pending()
        queries = QueryCounter()
        device = language_model.resolved_device()
        if pending:
            stats = base_component_stats(warehouse)
            # The judge is always the plain base model; one copy of the weights serves both (the RL
            # policy is that copy with its adapter on).
            models = language_model.open_models({"policy": adapter, "judge": None})
            policy, judge = queries.wrap(models["policy"], "generator"), queries.wrap(models["judge"], "judge")
            scorer = feedback_scorer.build(judge, device, stats, language_model.scoring_batch_size, reward_dir)
            versions = scorer.versions()
            report = progress_logger(context, name, settings["batch_size"] * params.max_new_tokens)
            started = time.monotonic()
            for done, batch in enumerate(pending, start=1):
                rows = generate_scored_instances(
                    policy,
                    scorer,
                    [i["instruction"] for i in batch.inputs],
                    params,
                    settings["batch_size"],
                    settings["seed"] + batch.index,
                    is_classification=[i.get("is_classification", False) for i in batch.inputs],
                )
                keys = [
                    {
                        "instance_id": i["instance_id"],
                        "replicate": i.get("replicate", 0),
                        "candidate_index": i.get("candidate_index", 0),
                        "instruction_id": i["instruction_id"],
                    }
                    for i in batch.inputs
                ]
                staged = scored_instance_frame(
                    keys, rows, policy.provenance, versions, params, plan.plan_id, policy_adapter=adapter
                )
                ledger.commit_batch(plan, batch, _staging(name), staged, context.run_id)
                report(done, len(pending), time.monotonic() - started)
        order = {
            f"{item['instance_id']}/{item.get('candidate_index', 0)}": k
            for k, item in enumerate(i for b in plan.batches for i in b.inputs)
        }
        staged = warehouse.query(f'SELECT * FROM "{_staging(name)}" WHERE run_id = ?', [plan.plan_id])
        # Rows staged by a version without candidates or replicates are candidate 0 of replicate 0.
        staged = staged.with_columns(
            *(pl.lit(0, pl.Int64).alias(c) for c in ("candidate_index", "replicate") if c not in staged.columns)
        )
        staged = staged.sort(
            (pl.col("instance_id") + "/" + pl.col("candidate_index").fill_null(0).cast(pl.Utf8)).replace_strict(
                order, return_dtype=pl.Int64
            )
        )
        # Conflicting outputs are judged across the whole plan, so the filter runs once all batches are in.
        chosen, reasons = choose_and_filter(staged.to_dicts())
        df = staged.with_columns(
            pl.Series("chosen", chosen),
            pl.Series("keep", [r is None for r in reasons]),
            pl.Series("filter_reason", reasons, dtype=pl.Utf8),
            # This run's model queries (a resumed plan: those of its missing batches), for the query ledger.
            pl.lit(queries.as_json()).alias("llm_queries"),
            pl.lit(pool).alias("pool"),
        )
        ledger.finish(plan, context.run_id, replace={name: df}, clear_rows_of=_staging(name))
        return dg.MaterializeResult(
            metadata={
                **table_metadata(df, ["instruction", "input", "output", "reward", "keep"], table=name),
                "parse_rate": float((df["parse_status"] == "ok").mean()),
                "kept_pairs": int(df["keep"].sum()),
                "mean_reward": float(df.filter(pl.col("chosen"))["reward"].mean()),
                "candidates_per_instance": settings.get("candidates_per_instance", 1),
                "replicates": settings.get("replicates", 1),
                "generations": df.height,
                "policy": dg.MetadataValue.path(adapter) if adapter else "base model (no RL adapter)",
                "plan_run_id": plan.plan_id,
                "resumed_plan": plan.resumed,
                "batches_planned": len(plan.batches),
                "batches_committed_before_this_run": len(plan.batches) - len(pending),
                "batches_generated": len(pending),
                "llm_queries": queries.as_json(),
                **peak_memory(device),
            }
        )

    return _instance_pairs


instance_output_pairs = build_instance_pairs_asset(
    INSTANCE_PAIRS,
    groups.REFINE_AF,
    use_rl_policy=True,
    description="REFINE-AF: the RL-refined policy writes input/output instances for the kept instructions; each "
    "is parsed, scored by the same automated feedback, and filtered (the instance gate: unparseable, empty, "
    "cut, looping, copied or off-label outputs; one input with conflicting outputs). "
    "`keep` marks the rows used for SFT.",
)

selfinstruct_instance_pairs = build_instance_pairs_asset(
    SELFINSTRUCT_PAIRS,
    groups.SELF_INSTRUCT,
    use_rl_policy=False,
    description="The Self-Instruct baseline (no RL): the base model writes the instances for the same kept "
    "instructions, with the same prompts, sampling, scoring and filters as instance_output_pairs; "
    "policy_adapter is null.",
)

bestofn_instance_pairs = build_instance_pairs_asset(
    BESTOFN_PAIRS,
    groups.BEST_OF_N,
    use_rl_policy=False,
    config_class=BestOfNConfig,
    description="The best-of-N control (no RL): the base model writes `candidates_per_instance` candidates for each "
    "instance of the same kept instructions, with the same prompts, sampling and scoring as the other "
    "instance stages; the candidate with the highest training reward is `chosen` (the others are kept "
    "with filter_reason not_best_of_n), then the same filters. What the reward buys by selection alone, "
    "at a generation budget the query ledger shows beside RL's.",
)
