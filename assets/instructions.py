"""Stage 1: Self-Instruct bootstrapping. One step generates instructions batch by batch and
decides each batch at once (filters, ROUGE-L de-duplication against the seeds and everything kept
so far, a model-made classification label), the way Self-Instruct iterates the two: the pool that
de-duplicates a batch is the one the earlier batches grew. Both tables grow run after run."""

import random
import time
from dataclasses import asdict

import dagster as dg
import polars as pl

from refine_af_pipeline.instructions.bootstrap import (
    BootstrapPrompt,
    BootstrapSettings,
    PoolItem,
    classify_instructions,
    deduplication_rows,
    generate_instruction_rows,
    sample_prompt,
)
from refine_af_pipeline.instructions.pools import UNNAMED_POOL, derived_pool_name, generator_name
from refine_af_pipeline.instructions.rouge import DEFAULT_THRESHOLD, RougeDeduplicator
from refine_af_pipeline.llm.backend import SamplingParams, ServedModel
from refine_af_pipeline.llm.query_count import QueryCounter
from resources import LanguageModelResource, Warehouse
from resources.batch_ledger import BatchLedger

from . import groups
from .columns import declare
from .metadata import metadata_table, peak_memory, progress_logger, stored_table_metadata, table_metadata
from .seed_pool import SEED_POOL

RAW, DEDUP, POOL = "raw_instructions", "deduplicated_instructions", "instruction_pool"
BOOTSTRAP = "bootstrap_instructions"  # the multi-asset (one step) that writes the three
COLUMNS = declare(
    {
        POOL: {
            "pool": "the instruction pool the run grew; the latest row's is the pool every later stage reads",
            "named_by": "config (bootstrap_instructions.pool) or derived (<seed file>-<seed digest>--<generator>)",
            "seed_source": "the seed file of the run (seed_pool.source)",
            "seed_set_digest": "sha256 of the run's seed tasks' content (seed_pool.seed_set_digest)",
            "generator_model": "the model that generated for the run, as it names a pool",
            "kept_instructions": "kept instructions in the pool after the run",
        },
        f"{POOL}/pools": {
            "pool": "an instruction pool of this data folder",
            "kept_instructions": "its kept instructions after its latest run",
            "seed_source": "the seed file of its latest run",
            "generator_model": "the generator model of its latest run",
            "runs": "bootstrap runs that grew it",
        },
        RAW: {
            "instruction_id": "id of the generated instruction: <plan id prefix>-<prompt index>-<position in the "
            "response>",
            "instruction": "the instruction as parsed from the response's list",
            "parse_status": "ok, or why the response gave no instruction: empty, unparseable",
            "position_in_response": "index of the instruction within its response's list (0-based)",
            "run_id": "run that planned the prompt (generation_plans; a run resuming the plan keeps its id)",
            "prompt_index": "index of the bootstrap prompt in its plan (0-based)",
            "prompt_example_ids": "ids of the 8 example instructions the prompt showed, as a JSON list (seed ids "
            "and instruction ids)",
            "prompt_type": "bootstrap prompt variant: general or classification-only",
            "raw_response": "the model's whole continuation of the bootstrap prompt",
            "response_tokens": "tokens the model generated for the prompt",
            "hit_token_limit": "whether the response stopped at max_new_tokens",
            "dropped_truncated_item": "whether a last list item cut by the token limit was dropped",
            "pool": "the instruction pool the prompt was planned for (seed_pool names it)",
        },
        DEDUP: {
            "source_run_id": "run_id of the candidate's raw_instructions row (the plan that generated it)",
            "run_id": "run that decided the candidate",
            "decision": "kept or rejected",
            "reason": "why a candidate was rejected (rouge_l_above_threshold, too_short, blacklisted:<word>, "
            "unparseable_response ...); null when kept",
            "max_rouge_l": "highest ROUGE-L F-measure against the seeds and the instructions kept before it (0-1; "
            "rejected above the threshold, 0.7 by default); null where an earlier filter decided",
            "most_similar_instruction": "the instruction that gave max_rouge_l",
            "is_classification": "whether the kept instruction is a classification task: the model's label, "
            "P(Yes) > 0.5 (null when rejected)",
            "is_classification_p": "the model's P(Yes) to 'Is it classification?' (0-1)",
            "classification_model_id": "model that labelled is_classification",
            "pool": "the instruction pool the candidate was generated for and de-duplicated within",
        },
    }
)
RAW_PREVIEW = ["instruction_id", "instruction", "parse_status"]
DEDUP_PREVIEW = ["instruction", "decision", "reason", "max_rouge_l"]
_DECISION_SCHEMA = {
    "max_rouge_l": pl.Float64,
    "most_similar_instruction": pl.Utf8,
    "reason": pl.Utf8,
    "is_classification": pl.Boolean,
    "is_classification_p": pl.Float64,
    "classification_model_id": pl.Utf8,
    "pool": pl.Utf8,
}


class BootstrapConfig(dg.Config, BootstrapSettings):
    """Run config of `bootstrap_instructions`: the fields of BootstrapSettings
    (refine_af_pipeline/instructions/bootstrap.py)."""


class _Decider:
    """Decides raw rows in order against the seeds and the kept instructions of one pool, labels the
    kept ones."""

    def __init__(
        self,
        warehouse: Warehouse,
        language_model: LanguageModelResource,
        seeds: list[str],
        queries: QueryCounter,
        pool: str,
    ):
        # Ids are unique across pools (their plan's run id): any decided id is done.
        decided = warehouse.query(f"SELECT instruction_id FROM {DEDUP}") if warehouse.table_exists(DEDUP) else None
        self.decided = set() if decided is None else set(decided["instruction_id"].to_list())
        done = rows_of_pool(warehouse, DEDUP, pool)
        kept = [] if done is None else done.filter(pl.col("decision") == "kept").to_dicts()
        self.pool = pool
        # The pool's kept instructions (earlier runs' and this run's): the machine examples and the target.
        self.kept = [PoolItem(r["instruction_id"], r["instruction"], bool(r["is_classification"])) for r in kept]
        self.dedup = RougeDeduplicator(seeds + [k.instruction for k in self.kept], DEFAULT_THRESHOLD)
        self.language_model, self.queries = language_model, queries
        self.rows: list[dict] = []  # decided by this run

    def decide(self, raw_rows: list[dict], run_id: str, model: ServedModel | None = None) -> pl.DataFrame:
        rows = deduplication_rows([r for r in raw_rows if r["instruction_id"] not in self.decided], self.dedup, run_id)
        for row in rows:
            row["pool"] = self.pool
        kept = [row for row in rows if row["decision"] == "kept"]
        if kept:
            if model is None:
                model = _labeller(self.language_model, self.queries)
            labels = classify_instructions(
                model, [row["instruction"] for row in kept], self.language_model.scoring_batch_size
            )
            for row, (label, p) in zip(kept, labels):
                row.update(
                    is_classification=label,
                    is_classification_p=p,
                    classification_model_id=model.provenance.served_model,
                )
        self.decided.update(row["instruction_id"] for row in rows)
        self.rows += rows
        self.kept += [PoolItem(r["instruction_id"], r["instruction"], bool(r["is_classification"])) for r in kept]
        return _decision_frame(rows)

    @property
    def kept_total(self) -> int:
        return len(self.kept)


def _labeller(language_model: LanguageModelResource, queries: QueryCounter) -> ServedModel:
    """The base model, which writes the instructions (generator) and labels the kept ones (judge)."""
    model = queries.wrap(language_model.open_models({"base": None})["base"], "generator", scoring_role="judge")
    model.require(
        "next_token_distribution", "bootstrap_instructions (the is-classification label of kept instructions)"
    )
    return model


def _decision_frame(rows: list[dict]) -> pl.DataFrame:
    if rows:
        return pl.DataFrame(rows, schema_overrides=_DECISION_SCHEMA, infer_schema_length=None)
    return pl.DataFrame(
        schema={
            "instruction_id": pl.Utf8,
            "instruction": pl.Utf8,
            "source_run_id": pl.Utf8,
            "run_id": pl.Utf8,
            "decision": pl.Utf8,
            **_DECISION_SCHEMA,
        }
    )


def _new_plan(
    context: dg.AssetExecutionContext,
    config: BootstrapConfig,
    ledger: BatchLedger,
    seeds: list[PoolItem],
    machine: list[PoolItem],
    batch_size: int,
    queries: QueryCounter,
    pool: str,
):
    rng = random.Random(f"{config.seed}-{context.run_id}")
    prompts = [
        asdict(sample_prompt(seeds, machine, rng, classification=k < config.classification_prompts))
        for k in range(config.num_prompts)
    ]
    settings = dict(
        config.sampling_params().as_dict(),
        seed=config.seed,
        batch_size=batch_size,
        target_pool_size=config.target_pool_size,
        pool=pool,
    )
    return ledger.start_plan(
        context.run_id,
        settings,
        [prompts[s : s + batch_size] for s in range(0, len(prompts), batch_size)],
        queries.counts,
    )


@dg.multi_asset(
    name=BOOTSTRAP,
    group_name=groups.SHARED_POOL,
    pool="gpu",
    can_subset=False,
    specs=[
        dg.AssetSpec(
            RAW,
            deps=[SEED_POOL],
            kinds={"duckdb", "pytorch"},
            description=(
                "Instructions the model generated from Self-Instruct prompts (8 numbered examples, up to 2 "
                "machine-generated, the model continues the list). Every row keeps its provenance: prompt "
                "example ids, model, sampling parameters, run id, raw response and parse status."
            ),
        ),
        dg.AssetSpec(
            DEDUP,
            deps=[SEED_POOL, RAW],
            kinds={"duckdb"},
            description=(
                "The decision on every raw instruction: filtered (length, keyword blacklist, punctuation, "
                'non-ASCII, "Write a program") and de-duplicated (rejected when its ROUGE-L F-measure '
                "against any seed or already-kept instruction is above 0.7), with the max score, the most "
                "similar instruction and the reason; kept rows get a model-made is_classification label."
            ),
        ),
        dg.AssetSpec(
            POOL,
            deps=[SEED_POOL],
            kinds={"duckdb"},
            description=(
                "One row per bootstrap run: the instruction pool it grew (named by the seed set and the generator "
                "model unless configured) and its kept instructions after the run. Every later stage reads the "
                "latest row's pool, and only that pool's instructions."
            ),
        ),
    ],
)
def bootstrap_instructions(
    context: dg.AssetExecutionContext,
    config: BootstrapConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
):
    """Generates prompt batch by batch following a plan recorded first (generation_plans); each
    batch's raw rows and their decisions are committed in one transaction, so a run killed midway
    is finished by the next materialization with nothing regenerated, lost or decided twice."""
    seeds_df = warehouse.read_table(SEED_POOL)
    pool_row = _pool_of_run(config, seeds_df, language_model, context.run_id)
    pool = pool_row["pool"]
    tag_run_with_pool(context, pool)
    ledger = BatchLedger(warehouse, RAW)
    plan = ledger.take_unfinished(context.run_id, context.log, lambda p: _abandon_reason(p.settings, config, pool))
    seeds = [PoolItem(r["id"], r["instruction"], r["is_classification"]) for r in seeds_df.iter_rows(named=True)]
    # The run's model queries are its plan's (generation_plans.llm_queries, committed with each batch
    # and summed over the runs that worked on a resumed plan): the query ledger reads them there.
    queries = QueryCounter()
    for role in ("generator", "judge"):  # a run with nothing to do records zeros, not nothing
        queries.add(role, 0)
    decider = _Decider(warehouse, language_model, seeds_df["instruction"].to_list(), queries, pool)
    context.log.info(
        f"instruction pool {pool!r} (named {pool_row['named_by']}): {decider.kept_total} kept instructions so far "
        f"(target {config.target_pool_size}); this run de-duplicates against and adds to this pool alone"
    )
    _decide_leftovers(context, warehouse, decider, pool)
    machine = list(decider.kept)
    if plan is None and len(machine) >= config.target_pool_size:
        context.log.info(
            f"pool already has {len(machine)} kept instructions (target {config.target_pool_size}); nothing generated"
        )
        ledger.record_empty_plan(
            context.run_id,
            {"target_pool_size": config.target_pool_size, "pool": pool},
            "skipped_at_target",
            queries.counts,
        )
        metadata = {"rows_this_run": 0, "skipped": "target pool size reached", "pool": pool}
        yield dg.MaterializeResult(
            asset_key=RAW,
            metadata={
                **stored_table_metadata(warehouse, RAW, RAW_PREVIEW),
                **metadata,
                "llm_queries": queries.as_json(),
            },
        )
        yield _dedup_result(warehouse, decider, language_model)
        yield _pool_result(warehouse, pool_row, decider.kept_total)
        return
    if plan is None:
        batch_size = language_model.generation_batch_size(config.generation_batch_size)
        plan = _new_plan(context, config, ledger, seeds, machine, batch_size, queries, pool)
    pending = plan.pending()
    rows_this_run, stopped_early = _generate(context, plan, ledger, decider, language_model, queries, pool)
    ledger.finish(
        plan, context.run_id, status="stopped_at_target" if stopped_early else "finished", queries=queries.counts
    )
    yield _raw_result(warehouse, plan, len(pending), rows_this_run, pool, queries, language_model)
    yield _dedup_result(warehouse, decider, language_model)
    yield _pool_result(warehouse, pool_row, decider.kept_total)


def _decide_leftovers(context: dg.AssetExecutionContext, warehouse: Warehouse, decider: _Decider, pool: str) -> None:
    """The pool's raw rows without a decision (a database from before both were committed together):
    decided first, in generation order, so the pool the run grows is complete."""
    undecided = rows_of_pool(warehouse, RAW, pool, order_by="run_id, prompt_index, position_in_response")
    if undecided is None:
        return
    undecided = undecided.filter(~pl.col("instruction_id").is_in(list(decider.decided)))
    if undecided.height:
        context.log.info(f"deciding {undecided.height} raw instructions left undecided by an earlier run")
        warehouse.write_table(DEDUP, decider.decide(undecided.to_dicts(), context.run_id), mode="append")


def _generate(
    context: dg.AssetExecutionContext,
    plan,
    ledger: BatchLedger,
    decider: _Decider,
    language_model: LanguageModelResource,
    queries: QueryCounter,
    pool: str,
) -> tuple[int, bool]:
    """Generates and decides the plan's pending batches, each committed with its decisions; stops
    once the pool reaches the plan's target. (raw rows written, whether it stopped at the target)"""
    settings = plan.settings
    params = SamplingParams(
        settings["max_new_tokens"], settings["temperature"], settings["top_p"], settings["do_sample"]
    )
    step, target = settings["batch_size"], settings["target_pool_size"]
    pending = plan.pending()
    rows_this_run = 0
    if not pending:
        return 0, False
    model = _labeller(language_model, queries)
    served = model.provenance
    context.log.info(
        f"generating {len(pending)} batches of up to {step} prompts with {served.served_model} "
        f"({served.backend}, {served.engine_version})"
    )
    report = progress_logger(context, RAW, step * params.max_new_tokens)
    started = time.monotonic()
    for done, batch in enumerate(pending, start=1):
        if decider.kept_total >= target:
            context.log.info(
                f"target pool size {target} reached ({decider.kept_total} kept); stopped "
                f"before batch {batch.index + 1} of {len(plan.batches)}"
            )
            return rows_this_run, True
        prompts = [BootstrapPrompt(**p) for p in batch.inputs]
        # Rows keep the plan's run id: ids stay unique and a resumed batch reads as part of its run.
        raw_rows = generate_instruction_rows(
            model, prompts, params, plan.plan_id, step, settings["seed"] + batch.index, id_offset=batch.index * step
        )
        for row in raw_rows:
            row["pool"] = pool
        decisions = decider.decide(raw_rows, context.run_id, model)
        ledger.commit_batch(
            plan,
            batch,
            RAW,
            pl.DataFrame(raw_rows),
            context.run_id,
            also_append={DEDUP: decisions},
            queries=queries.counts,
        )
        rows_this_run += len(raw_rows)
        report(done, len(pending), time.monotonic() - started)
    return rows_this_run, False


def _raw_result(
    warehouse: Warehouse,
    plan,
    pending_before: int,
    rows_this_run: int,
    pool: str,
    queries: QueryCounter,
    language_model: LanguageModelResource,
) -> dg.MaterializeResult:
    """raw_instructions' materialization: the plan's rows and what this run did to the plan."""
    df = (
        warehouse.query(
            f"SELECT * FROM {RAW} WHERE run_id = ? ORDER BY prompt_index, position_in_response", [plan.plan_id]
        )
        if warehouse.table_exists(RAW)
        else pl.DataFrame(schema={c: pl.Utf8 for c in [*RAW_PREVIEW, "model_id"]} | {"prompt_index": pl.Int64})
    )
    return dg.MaterializeResult(
        asset_key=RAW,
        metadata={
            **table_metadata(df, RAW_PREVIEW, total_rows=warehouse.row_count(RAW), table=RAW),
            "rows_this_run": rows_this_run,
            "pool": pool,
            "plan_run_id": plan.plan_id,
            "resumed_plan": plan.resumed,
            "batches_planned": len(plan.batches),
            "batches_committed_before_this_run": len(plan.batches) - pending_before,
            "batches_generated": pending_before - len(plan.pending()),
            "prompts_used": df["prompt_index"].n_unique(),
            "parsed_instructions": df.filter(pl.col("parse_status") == "ok").height,
            "unparseable_responses": df.filter(pl.col("parse_status") != "ok").height,
            "model_id": df["model_id"][0] if df.height else "",
            "llm_queries": queries.as_json(),
            # The query ledger's figure: every run that worked on the plan (a resumed plan's earlier runs too).
            "plan_llm_queries": plan.queries_json(queries.counts),
            **peak_memory(language_model.resolved_device()),
        },
    )


def _pool_of_run(
    config: BootstrapConfig, seeds_df: pl.DataFrame, language_model: LanguageModelResource, run_id: str
) -> dict:
    """The pool this run grows: the configured name, else the seed set's and the generator's."""
    if "seed_set_digest" not in seeds_df.columns:
        raise dg.Failure(f"{SEED_POOL} was written before pools were named: materialize {SEED_POOL} again")
    source, digest = seeds_df["source"][0], seeds_df["seed_set_digest"][0]
    generator = generator_name(language_model.model, language_model.served_model_name)
    return {
        "pool": config.pool or derived_pool_name(source, digest, generator),
        "named_by": "config" if config.pool else "derived",
        "seed_source": source,
        "seed_set_digest": digest,
        "generator_model": generator,
        "run_id": run_id,
    }


def _pool_result(warehouse: Warehouse, pool_row: dict, kept: int) -> dg.MaterializeResult:
    row = pl.DataFrame([{**pool_row, "kept_instructions": kept}])
    warehouse.write_table(POOL, row, mode="append")
    pools = warehouse.query(
        f"SELECT pool, arg_max(kept_instructions, rowid) AS kept_instructions, arg_max(seed_source, rowid) AS "
        f"seed_source, arg_max(generator_model, rowid) AS generator_model, count(*) AS runs FROM {POOL} "
        "GROUP BY pool ORDER BY max(rowid) DESC"
    )
    return dg.MaterializeResult(
        asset_key=POOL,
        metadata={
            **table_metadata(row, ["pool", "named_by", "kept_instructions"], table=POOL),
            "pool": pool_row["pool"],
            "kept_instructions": kept,
            "pools": metadata_table(pools, table=f"{POOL}/pools"),
            "pool_count": pools.height,
        },
    )


POOL_TAG = "refine_af/pool"


def tag_run_with_pool(context: dg.AssetExecutionContext, pool: str) -> None:
    """Tags the run with the pool it reads or grows (the UI's runs filter by tag). A run that reads
    two pools (the pool was switched between its steps) keeps the first and logs a warning."""
    tagged = context.instance.get_run_by_id(context.run_id).tags.get(POOL_TAG)
    if tagged is None:
        context.instance.add_run_tags(context.run_id, {POOL_TAG: pool})
    elif tagged != pool:
        context.log.warning(f"this run is tagged with pool {tagged!r} and this step reads pool {pool!r}")


def current_pool(warehouse: Warehouse) -> str:
    """The pool the latest bootstrap run grew: the one every later stage reads."""
    latest = warehouse.latest_run_rows(POOL, ["pool"])
    if latest is None or latest.height == 0:
        raise dg.Failure(f"{POOL} is missing: materialize {BOOTSTRAP} first (it names the instruction pool)")
    return latest["pool"][-1]


def rows_of_pool(warehouse: Warehouse, table: str, pool: str, order_by: str = "rowid") -> pl.DataFrame | None:
    """The rows of raw or deduplicated instructions that belong to `pool`, in `order_by` order; None
    when the table is missing. Rows written before pools were named (no or a NULL pool column)
    belong to UNNAMED_POOL."""
    columns = warehouse.table_columns(table)
    if not columns:
        return None
    if "pool" not in columns:
        df = warehouse.query(f'SELECT * FROM "{table}" ORDER BY {order_by}')
        return df if pool == UNNAMED_POOL else df.clear()
    return warehouse.query(
        f"SELECT * FROM \"{table}\" WHERE coalesce(pool, '{UNNAMED_POOL}') = ? ORDER BY {order_by}", [pool]
    )


def _abandon_reason(plan_settings: dict, config: BootstrapConfig, pool: str) -> str | None:
    """Why an unfinished plan must not be resumed by this run (None: resume it)."""
    if not config.resume_unfinished:
        return "resume_unfinished is off; its committed rows and their decisions stay"
    planned_for = plan_settings.get("pool", UNNAMED_POOL)
    if planned_for != pool:
        return (
            f"it was planned for pool {planned_for!r} and this run grows pool {pool!r}; its committed rows "
            f"and their decisions stay in {planned_for!r}"
        )
    return None


def _dedup_result(
    warehouse: Warehouse, decider: _Decider, language_model: LanguageModelResource
) -> dg.MaterializeResult:
    df = _decision_frame(decider.rows)
    reasons = df.group_by("reason").len().sort("len", descending=True) if df.height else df
    return dg.MaterializeResult(
        asset_key=DEDUP,
        metadata={
            **table_metadata(df, DEDUP_PREVIEW, total_rows=warehouse.row_count(DEDUP), table=DEDUP),
            "rows_this_run": df.height,
            "kept_this_run": int((df["decision"] == "kept").sum()) if df.height else 0,
            "kept_total": decider.kept_total,
            "pool": decider.pool,
            "rejection_reasons": dg.MetadataValue.md(
                "\n".join(f"- {r['reason']}: {r['len']}" for r in reasons.iter_rows(named=True))
                if df.height
                else "_none_"
            ),
            **peak_memory(language_model.resolved_device()),
        },
    )
