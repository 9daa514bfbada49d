"""The TeaMs-RL branch: an instructor policy trained with TRPO to choose instruction operations
(teams_operation_policy), compared with uniform-random and fixed operations on held-out seed tasks
(teams_policy_comparison); its chains executed by the expert model on the seed tasks
(teams_evolved_instructions), the expert's answers (teams_instruction_pairs), and the same SFT as
the other branches (teams_finetuned_model, in finetune.py)."""

import json
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from refine_af_pipeline.evaluation.paired_comparison import paired_bootstrap
from refine_af_pipeline.instructions.filters import rejection_reason
from refine_af_pipeline.instructions.instances import filter_reason
from refine_af_pipeline.instructions.rouge import RougeDeduplicator
from refine_af_pipeline.llm.backend import ServedModel, render_prompt
from refine_af_pipeline.llm.query_count import QueryCounter
from refine_af_pipeline.plots import line_chart_png
from refine_af_pipeline.teams.call_cache import CallCache
from refine_af_pipeline.teams.environment import BatchedEvolutionVecEnv
from refine_af_pipeline.teams.evolution import (
    EvolutionStepper,
    fixed_chooser,
    policy_chooser,
    run_chains,
    uniform_chooser,
)
from refine_af_pipeline.teams.headroom import headroom
from refine_af_pipeline.teams.instructor import InstructorSettings, load_policy, save_policy, train_instructor
from refine_af_pipeline.teams.reviewer import InformationGainReviewer
from refine_af_pipeline.teams.settings import (
    EvolvedInstructionsSettings,
    ExpertAnswerSettings,
    PolicyComparisonSettings,
)
from refine_af_pipeline.training.splits import in_share
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.warehouse import insert_rows

from .metadata import metadata_table, peak_memory, png_markdown, progress_logger, table_metadata
from .shared import provenance_columns, upstream_metadata

POLICY = "teams_operation_policy"
TRANSITIONS = "teams_policy_transitions"
COMPARISON_CHECK = "teams_policy_beats_uniform"
SPLIT_SALT = "teams-heldout"


class InstructorConfig(dg.Config, InstructorSettings):
    """Run config of `teams_operation_policy`: the fields of InstructorSettings (refine_af_pipeline/teams/instructor.py)."""


class PolicyComparisonConfig(dg.Config, PolicyComparisonSettings):
    """Run config of `teams_policy_comparison`: the fields of PolicyComparisonSettings (refine_af_pipeline/teams/settings.py)."""


class EvolvedInstructionsConfig(dg.Config, EvolvedInstructionsSettings):
    """Run config of `teams_evolved_instructions`: the fields of EvolvedInstructionsSettings (refine_af_pipeline/teams/settings.py)."""


class ExpertAnswerConfig(dg.Config, ExpertAnswerSettings):
    """Run config of `teams_instruction_pairs`: the fields of ExpertAnswerSettings (refine_af_pipeline/teams/settings.py)."""


def _seed_tasks(warehouse: Warehouse, heldout_share: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training seeds, held-out seeds) as (id, instruction), split by a stable id hash."""
    df = warehouse.read_table("seed_pool")
    if df is None or df.height == 0:
        raise dg.Failure("seed_pool is empty or missing: materialize seed_pool first")
    pairs = list(zip(df["id"].to_list(), df["instruction"].to_list()))
    held = [p for p in pairs if in_share(p[0], heldout_share, SPLIT_SALT)]
    return [p for p in pairs if not in_share(p[0], heldout_share, SPLIT_SALT)], held


def _cache(artifact_store: ArtifactStore) -> CallCache:
    return CallCache(Path(artifact_store.root) / "teams_call_cache.sqlite")


def _policy_settings(context: dg.AssetExecutionContext) -> tuple[InstructorSettings, dict]:
    """The settings the latest policy was trained with, and that materialization's metadata."""
    metadata = upstream_metadata(context, POLICY)
    path = metadata.get("policy_path")
    if not path or not Path(path).is_file():
        raise dg.Failure(
            f"the latest materialization of {POLICY} (run {metadata['run_id']}) left no policy file "
            f"({path}); materialize {POLICY} again"
        )
    return InstructorSettings(**json.loads(metadata["settings"])), metadata


def _stepper(
    rewriter: ServedModel,
    reviewer_model: ServedModel,
    settings: InstructorSettings,
    batch_size: int,
    scoring_batch_size: int,
    cache: CallCache,
) -> tuple[EvolutionStepper, InformationGainReviewer]:
    reviewer = InformationGainReviewer(reviewer_model, scoring_batch_size, settings.near_copy_rouge_l, cache)
    return EvolutionStepper(rewriter, reviewer, settings.sampling_params(), batch_size, settings.seed, cache), reviewer


def _base_model_stepper(
    context: dg.AssetExecutionContext,
    language_model: LanguageModelResource,
    artifact_store: ArtifactStore,
    settings: InstructorSettings,
    queries: QueryCounter,
):
    """(base model, stepper, reviewer, cache): the base model rewrites and reviews (instructor
    training and the comparison), each role counted apart."""
    base = language_model.open_models({"base": None})["base"]
    cache = _cache(artifact_store)
    stepper, reviewer = _stepper(
        queries.wrap(base, "rewriter"),
        queries.wrap(base, "reviewer"),
        settings,
        language_model.generation_batch_size(context.op_def.name),
        language_model.scoring_batch_size,
        cache,
    )
    return base, stepper, reviewer, cache


def _sample(pairs: list[tuple[str, str]], limit: int, seed: int) -> list[tuple[str, str]]:
    """A reproducible sample of at most `limit` seed tasks, in their original order (0 = all)."""
    if not limit or len(pairs) <= limit:
        return pairs
    chosen = np.random.default_rng(seed).choice(len(pairs), limit, replace=False)
    return [pairs[k] for k in sorted(chosen)]


def _transition_frame(
    rows: list[dict], rewriter: ServedModel, reviewer: InformationGainReviewer, run_id: str, **extra
) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                **r,
                **extra,
                **provenance_columns(rewriter.provenance),
                "reviewer_version": reviewer.version,
                "run_id": run_id,
            }
            for r in rows
        ],
        schema_overrides={"p_differs": pl.Float64, "rule": pl.Utf8, "reward": pl.Float64},
        infer_schema_length=None,
    )


@dg.multi_asset(
    name=POLICY,
    group_name="teams",
    pool="gpu",
    can_subset=False,
    specs=[
        dg.AssetSpec(
            POLICY,
            deps=["seed_pool"],
            kinds={"duckdb", "pytorch"},
            description=(
                "TeaMs-RL's instructor: a TRPO policy (sb3-contrib, an MLP over the chain's state: previous operation, "
                "step, whether the last rewrite was rejected, features of the instruction; teams/state.py) "
                "that picks the next of six rewrite operations; the reward is the reviewer's P(the rewrite adds "
                "something). Weights in the artifact store; the table is the log per update (mean reward, entropy, "
                "KL, action shares)."
            ),
        ),
        dg.AssetSpec(
            TRANSITIONS,
            deps=["seed_pool"],
            kinds={"duckdb"},
            description=(
                "Every training step of the instructor: episode, seed task, step, operation, instruction before "
                "and after, the reviewer's reward and the rule that zeroed it, whether the cache served it."
            ),
        ),
    ],
)
def teams_operation_policy(
    context: dg.AssetExecutionContext,
    config: InstructorConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    artifact_store: ArtifactStore,
):
    """Episodes of `horizon` operations from seed tasks of the training split, `episodes_per_update`
    per TRPO update, every episode step batched over the episodes; the base model rewrites and
    (frozen) reviews. Rewrites and judgements are cached by model, prompt, sampling and seed."""
    train, held = _seed_tasks(warehouse, config.heldout_share)
    if not train:
        raise dg.Failure(f"heldout_share {config.heldout_share} holds out every seed task; lower it")
    queries = QueryCounter()
    base, stepper, reviewer, cache = _base_model_stepper(context, language_model, artifact_store, config, queries)
    env = BatchedEvolutionVecEnv(
        train, config.operations, config.horizon, stepper, config.episodes_per_update, seed=config.seed
    )
    started = time.monotonic()

    def on_update(row):
        context.log.info(
            f"{POLICY} update {row['update']}/{config.updates}: mean reward {row['mean_reward']:.3f}, "
            f"entropy {row['entropy']:.3f}, kl {row['kl']:.4f}, {time.monotonic() - started:.0f} s elapsed"
        )

    context.log.info(
        f"TeaMs-RL instructor: {config.updates} TRPO updates x {config.episodes_per_update} episodes x "
        f"{config.horizon} operations on {len(train)} training seed tasks ({len(held)} held out), "
        f"{base.provenance.served_model} ({base.provenance.backend})"
    )
    result = train_instructor(env, config, on_update)
    out_dir = artifact_store.run_dir(POLICY, context.run_id)
    policy_path = save_policy(result.model, out_dir / "instructor_trpo")
    log = pl.DataFrame(result.log).with_columns(
        pl.lit(str(policy_path)).alias("policy_path"),
        pl.lit(reviewer.version).alias("reviewer_version"),
        pl.lit(context.run_id).alias("run_id"),
    )
    transitions = _transition_frame(env.transitions, base, reviewer, context.run_id)
    transitions = transitions.with_columns(
        (pl.int_range(pl.len()) // (config.horizon * config.episodes_per_update) + 1).alias("update")
    )
    with warehouse.transaction() as conn:
        insert_rows(conn, POLICY, log, mode="replace")
        insert_rows(conn, TRANSITIONS, transitions, mode="replace")
    cache.close()
    by_op = transitions.group_by("operation").agg(pl.col("reward").mean().alias("mean_reward"), pl.len().alias("n"))
    # What the policy chose in each coarse state during its last update.
    last = transitions.filter(pl.col("update") == pl.col("update").max())
    choice_table = (
        last.group_by("state", "operation").len().pivot(on="operation", index="state", values="len").fill_null(0)
    )
    final = result.log[-1]
    yield dg.MaterializeResult(
        asset_key=TRANSITIONS,
        metadata={
            **table_metadata(transitions, ["update", "step", "operation", "after", "reward", "rule"]),
            "mean_reward_by_operation": metadata_table(by_op.sort("operation")),
            "rule_zero_counts": json.dumps(dict(Counter(r for r in transitions["rule"].to_list() if r))),
            "cached_rewrite_share": float(transitions["rewrite_cached"].mean()),
        },
    )
    yield dg.MaterializeResult(
        asset_key=POLICY,
        metadata={
            **table_metadata(log, ["update", "mean_reward", "entropy", "kl"]),
            "policy_path": dg.MetadataValue.path(str(policy_path)),
            "settings": json.dumps(config.model_dump()),
            "reviewer_version": reviewer.version,
            "training_curves": png_markdown(
                line_chart_png(
                    log["update"].to_list(),
                    {c: log[c].to_list() for c in ("mean_reward", "entropy", "kl", "rule_zero_share")},
                    "TeaMs-RL instructor (TRPO)",
                    xlabel="update",
                ),
                "instructor training",
            ),
            "action_share_curves": png_markdown(
                line_chart_png(
                    log["update"].to_list(),
                    {o: log[f"share_{o}"].to_list() for o in config.operations},
                    "operation shares per rollout",
                    xlabel="update",
                ),
                "action shares",
            ),
            "last_update_choices_by_state": metadata_table(choice_table.sort("state")),
            **{f"final_share_{o}": float(final[f"share_{o}"]) for o in config.operations},
            "first_mean_reward": float(result.log[0]["mean_reward"]),
            "final_mean_reward": float(final["mean_reward"]),
            "final_entropy": float(final["entropy"]),
            "train_seed_tasks": len(train),
            "heldout_seed_tasks": len(held),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "llm_queries": queries.as_json(),
            "train_seconds": round(time.monotonic() - started, 1),
            **peak_memory(language_model.resolved_device()),
        },
    )


def _best_fixed_operation(warehouse: Warehouse, operations: list[str]) -> str:
    """The operation with the highest mean reward in the policy's training transitions."""
    df = warehouse.read_table(TRANSITIONS)
    if df is None or df.height == 0:
        raise dg.Failure(f"{TRANSITIONS} is empty: materialize {POLICY} first")
    means = df.filter(pl.col("operation").is_in(operations)).group_by("operation").agg(pl.col("reward").mean())
    return means.sort(["reward", "operation"], descending=[True, False])["operation"][0]


@dg.asset(
    group_name="teams",
    kinds={"duckdb", "pytorch"},
    deps=[POLICY, TRANSITIONS, "seed_pool"],
    pool="gpu",
    check_specs=[
        dg.AssetCheckSpec(
            COMPARISON_CHECK,
            asset="teams_policy_comparison",
            description=(
                "Warns (never fails) unless the learned policy's mean reward per step on held-out seed tasks is "
                "above uniform-random operations'."
            ),
        )
    ],
)
def teams_policy_comparison(
    context: dg.AssetExecutionContext,
    config: PolicyComparisonConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    artifact_store: ArtifactStore,
):
    """Chains on held-out seed tasks from three choosers with the same per-chain random draws,
    decoding and frozen reviewer: the learned policy (sampled), uniform-random operations
    (WizardLM's choice) and the single operation with the best training reward. One row per
    (arm, seed task, step); the paired bootstrap CI of the per-seed mean reward in the metadata."""
    settings, policy_meta = _policy_settings(context)
    _, held = _seed_tasks(warehouse, settings.heldout_share)
    held = _sample(held, config.max_seeds, config.seed)
    if len(held) < 2:
        raise dg.Failure(
            f"only {len(held)} held-out seed task(s) at heldout_share {settings.heldout_share}; "
            f"raise it in {POLICY}'s config"
        )
    ops = settings.operations
    policy = load_policy(policy_meta["policy_path"], len(ops))
    best = _best_fixed_operation(warehouse, ops)
    arms = {
        "policy": policy_chooser(policy, len(ops), settings.horizon),
        "uniform": uniform_chooser(len(ops)),
        f"fixed:{best}": fixed_chooser(ops.index(best)),
    }
    queries = QueryCounter()
    base, stepper, reviewer, cache = _base_model_stepper(context, language_model, artifact_store, settings, queries)
    report = progress_logger(context, "teams_policy_comparison")
    started = time.monotonic()
    rows = run_chains(
        stepper,
        held,
        arms,
        settings.horizon,
        config.seed,
        ops,
        progress=lambda d, t: report(d, t, time.monotonic() - started),
    )
    cache.close()
    df = _transition_frame(rows, base, reviewer, context.run_id, policy_path=str(policy_meta["policy_path"]))
    warehouse.write_table("teams_policy_comparison", df)
    per_seed = df.group_by("arm", "seed_id").agg(pl.col("reward").mean()).sort("seed_id")
    mean_of = {arm: per_seed.filter(pl.col("arm") == arm)["reward"].to_list() for arm in arms}
    vs_uniform = paired_bootstrap(mean_of["policy"], mean_of["uniform"], config.bootstrap_resamples, seed=config.seed)
    vs_fixed = paired_bootstrap(
        mean_of["policy"], mean_of[f"fixed:{best}"], config.bootstrap_resamples, seed=config.seed
    )
    figures = {
        "heldout_seed_tasks": len(held),
        **{f"mean_reward_{arm.split(':')[0]}": float(np.mean(v)) for arm, v in mean_of.items()},
        "best_fixed_operation": best,
        "policy_minus_uniform": vs_uniform.mean_difference,
        "policy_minus_uniform_ci95": f"[{vs_uniform.ci_low:.4f}, {vs_uniform.ci_high:.4f}]",
        "policy_minus_uniform_ci95_low": vs_uniform.ci_low,
        "policy_minus_uniform_ci95_high": vs_uniform.ci_high,
        "policy_vs_uniform_wins_ties_losses": f"{vs_uniform.wins}/{vs_uniform.ties}/{vs_uniform.losses}",
        "policy_minus_fixed": vs_fixed.mean_difference,
        "policy_minus_fixed_ci95": f"[{vs_fixed.ci_low:.4f}, {vs_fixed.ci_high:.4f}]",
        "reviewer_version": reviewer.version,
    }
    shares = df.filter(pl.col("arm") == "policy")["operation"].value_counts(normalize=True).sort("operation")
    # The headroom any choice of operations has, from the policy's training transitions.
    room = headroom(warehouse.read_table(TRANSITIONS).select("state", "operation", "reward").to_dicts(), ops)
    figures.update(
        {
            "headroom_uniform": room.uniform,
            "headroom_best_fixed": room.best_fixed,
            "headroom_best_fixed_operation": room.best_fixed_operation,
            "headroom_best_per_state": room.best_per_state,
            "headroom": room.headroom,
        }
    )
    passed = vs_uniform.mean_difference > 0 and len(held) >= config.min_seeds
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["arm", "seed_id", "step", "operation", "reward"]),
            **figures,
            "policy_operation_shares": metadata_table(shares),
            "headroom_by_state": metadata_table(pl.DataFrame(room.per_state)) if room.per_state else "none",
            "per_arm_mean_reward_by_step": metadata_table(
                df.group_by("arm", "step").agg(pl.col("reward").mean()).sort("arm", "step")
            ),
            "llm_queries": queries.as_json(),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            **peak_memory(language_model.resolved_device()),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=COMPARISON_CHECK,
                passed=bool(passed),
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    **figures,
                    "rule": "passes when the policy's mean reward per step is above uniform's"
                    + (f" on at least {config.min_seeds} held-out seed tasks" if config.min_seeds else ""),
                },
            )
        ],
    )


def _expert_and_reviewer(
    language_model: LanguageModelResource, expert_model: LanguageModelResource, queries: QueryCounter
) -> tuple[ServedModel, ServedModel]:
    """(expert, frozen reviewer): one model when the expert is configured as the base model."""
    base = language_model.open_models({"base": None})["base"]
    expert = (
        base
        if expert_model.model_dump() == language_model.model_dump()
        else expert_model.open_models({"expert": None})["expert"]
    )
    return queries.wrap(expert, "expert"), queries.wrap(base, "reviewer")


@dg.asset(group_name="teams", kinds={"duckdb", "pytorch"}, deps=[POLICY, "seed_pool"], pool="gpu")
def teams_evolved_instructions(
    context: dg.AssetExecutionContext,
    config: EvolvedInstructionsConfig,
    warehouse: Warehouse,
    language_model: LanguageModelResource,
    expert_model: LanguageModelResource,
    artifact_store: ArtifactStore,
) -> dg.MaterializeResult:
    """The expert model executes the learned policy's operation chains (`horizon` rewrites each) on
    the seed tasks; every intermediate instruction is a row, reviewed by the same frozen reviewer.
    Kept: no reviewer rule fired, P(differs) at least min_p_differs, Self-Instruct's filters
    passed, and no ROUGE-L near duplicate of a seed task or of an instruction kept before it."""
    settings, policy_meta = _policy_settings(context)
    seeds = warehouse.read_table("seed_pool")
    pairs = list(zip(seeds["id"].to_list(), seeds["instruction"].to_list()))
    pairs = _sample(pairs, config.max_seeds, config.seed)
    policy = load_policy(policy_meta["policy_path"], len(settings.operations))
    queries = QueryCounter()
    expert, reviewer_model = _expert_and_reviewer(language_model, expert_model, queries)
    cache = _cache(artifact_store)
    stepper, reviewer = _stepper(
        expert,
        reviewer_model,
        settings,
        expert_model.generation_batch_size(context.op_def.name),
        language_model.scoring_batch_size,
        cache,
    )
    report = progress_logger(context, "teams_evolved_instructions")
    started = time.monotonic()
    chooser = policy_chooser(policy, len(settings.operations), settings.horizon)
    rows = run_chains(
        stepper,
        pairs,
        {"policy": chooser},
        settings.horizon,
        config.seed,
        settings.operations,
        progress=lambda d, t: report(d, t, time.monotonic() - started),
    )
    for r in rows:
        del r["arm"]
    cache.close()
    dedup = RougeDeduplicator(seeds["instruction"].to_list(), threshold=config.rouge_threshold)
    for r in rows:
        r["instruction_id"] = f"teams-{r['seed_id']}-{r['step']}"
        r["instruction"], r["previous_instruction"] = r.pop("after"), r.pop("before")
        reason = r["rule"] or (None if (r["p_differs"] or 0) >= config.min_p_differs else "no_information_gain")
        reason = reason or rejection_reason(r["instruction"])
        r["max_rouge_l"] = None
        if reason is None:  # the de-duplicator adds what it keeps to its pool
            decision = dedup.consider(r["instruction"])
            r["max_rouge_l"] = decision.max_rouge_l
            reason = None if decision.keep else "near_duplicate"
        r["filter_reason"], r["keep"] = reason, reason is None
    df = _transition_frame(rows, expert, reviewer, context.run_id, policy_path=str(policy_meta["policy_path"]))
    df = df.with_columns(pl.col("filter_reason").cast(pl.Utf8), pl.col("max_rouge_l").cast(pl.Float64))
    warehouse.write_table("teams_evolved_instructions", df)
    reasons = Counter(r or "kept" for r in df["filter_reason"].to_list())
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["seed_id", "step", "operation", "instruction", "reward", "keep"]),
            "seed_tasks": len(pairs),
            "evolved_instructions": df.height,
            "kept_instructions": int(df["keep"].sum()),
            "decisions": json.dumps(dict(reasons)),
            "mean_reward": float(df["reward"].mean()),
            "operation_shares": json.dumps(
                {
                    o: round(v, 4)
                    for o, v in zip(
                        *df["operation"]
                        .value_counts(normalize=True)
                        .sort("operation")
                        .to_dict(as_series=False)
                        .values()
                    )
                }
            ),
            "reviewer_version": reviewer.version,
            "llm_queries": queries.as_json(),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            **peak_memory(language_model.resolved_device()),
        }
    )


@dg.asset(group_name="teams", kinds={"duckdb", "pytorch"}, deps=["teams_evolved_instructions"], pool="gpu")
def teams_instruction_pairs(
    context: dg.AssetExecutionContext,
    config: ExpertAnswerConfig,
    warehouse: Warehouse,
    expert_model: LanguageModelResource,
    feedback_scorer: FeedbackScorerResource,
) -> dg.MaterializeResult:
    """The expert model answers each kept evolved instruction (its input, if any, is inside the
    instruction); the instance gate (the feedback_scorer's, as in the other branches) and the
    instance filters mark the pairs SFT uses (`keep`)."""
    evolved = warehouse.read_table("teams_evolved_instructions")
    if evolved is None or evolved.filter(pl.col("keep")).height == 0:
        raise dg.Failure(
            "teams_evolved_instructions has no kept instructions to answer; materialize it again with more "
            "seed tasks, or lower min_p_differs"
        )
    kept = evolved.filter(pl.col("keep")).select("instruction_id", "instruction", "seed_id", "operation", "step")
    if config.max_instructions and kept.height > config.max_instructions:
        kept = kept.sample(n=config.max_instructions, seed=config.seed).sort("instruction_id")
    queries = QueryCounter()
    expert = queries.wrap(expert_model.open_models({"expert": None})["expert"], "expert")
    params = config.sampling_params()
    prompts = [render_prompt(expert.tokenizer, i) for i in kept["instruction"].to_list()]
    started = time.monotonic()
    report = progress_logger(
        context,
        "teams_instruction_pairs",
        expert_model.generation_batch_size(context.op_def.name) * params.max_new_tokens,
    )
    with expert.for_generation() as model:
        gens = model.generate(
            prompts,
            params,
            expert_model.generation_batch_size(context.op_def.name),
            config.seed,
            lambda d, t, s: report(d, t, time.monotonic() - started),
        )
    gate = feedback_scorer.gate()
    rows = [
        dict(
            instance_id=iid,
            instruction_id=iid,
            instruction=text,
            input="",
            output=g.text.strip(),
            generation_tokens=g.n_tokens,
            hit_token_limit=g.hit_token_limit,
            parse_status="ok",
            gate_reason=gate.reason("ok", text, "", g.text.strip(), cut=g.hit_token_limit),
        )
        for iid, text, g in zip(kept["instruction_id"].to_list(), kept["instruction"].to_list(), gens)
    ]
    reasons = filter_reason(rows)
    df = pl.DataFrame(rows, schema_overrides={"gate_reason": pl.Utf8}).with_columns(
        pl.Series("filter_reason", reasons, dtype=pl.Utf8),
        pl.Series("keep", [r is None for r in reasons]),
        *(pl.lit(v).alias(k) for k, v in provenance_columns(expert.provenance).items()),
        pl.lit(json.dumps(params.as_dict())).alias("sampling_params"),
        pl.lit(context.run_id).alias("run_id"),
    )
    df = df.join(kept.select("instruction_id", "seed_id", "operation", "step"), on="instruction_id", how="left")
    warehouse.write_table("teams_instruction_pairs", df)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["instruction", "output", "keep"]),
            "kept_pairs": int(df["keep"].sum()),
            "filter_reasons": json.dumps(dict(Counter(r or "kept" for r in reasons))),
            "share_cut_at_token_limit": float(df["hit_token_limit"].mean()),
            "expert_model": expert.provenance.served_model,
            "llm_queries": queries.as_json(),
            **peak_memory(expert_model.resolved_device()),
        }
    )
