"""The TeaMs-RL branch: an instructor policy trained with TRPO to choose instruction operations
(teams_operation_policy), compared with uniform-random and fixed operations on held-out seed tasks
(teams_policy_comparison); its chains executed by the expert model on the seed tasks
(teams_evolved_instructions), the expert's answers (teams_instruction_pairs), and the same SFT as
the other branches (teams_finetuned_model, in finetune.py). The domain work is in
refine_af_pipeline/teams/; the stages after the instructor read what it trained (the policy file,
its settings, its reviewer) from its table."""

import json
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import polars as pl

from refine_af_pipeline.evaluation.conclusion import Conclusion, paired_conclusion
from refine_af_pipeline.llm.backend import ServedModel, render_prompt
from refine_af_pipeline.llm.query_count import QueryCounter
from refine_af_pipeline.plots import line_chart_png
from refine_af_pipeline.teams.call_cache import CallCache
from refine_af_pipeline.teams.comparison import ArmComparison, best_fixed_operation, compare_arms, comparison_arms
from refine_af_pipeline.teams.environment import BatchedEvolutionVecEnv
from refine_af_pipeline.teams.evolution import build_stepper, policy_chooser, run_chains
from refine_af_pipeline.teams.evolved_instructions import evolved_frame, evolved_row, keep_decisions
from refine_af_pipeline.teams.expert_answers import expert_answer_frame
from refine_af_pipeline.teams.instructor import InstructorSettings, save_policy, train_instructor
from refine_af_pipeline.teams.operations import OPERATION_NAMES
from refine_af_pipeline.teams.seed_tasks import SeedTask, sample_seed_tasks, seed_tasks, split_seed_tasks
from refine_af_pipeline.teams.settings import (
    EvolvedInstructionsSettings,
    ExpertAnswerSettings,
    PolicyComparisonSettings,
)
from refine_af_pipeline.teams.trained_policy import (
    HANDED_OVER,
    POLICY_TABLE,
    TRANSITIONS_TABLE,
    TrainedPolicy,
    policy_log_frame,
    settings_json,
)
from refine_af_pipeline.teams.transition_frames import policy_transitions_frame, transition_frame
from refine_af_pipeline.training.splits import sample_rows
from resources import ArtifactStore, FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.warehouse import insert_rows

from . import groups
from .checkpointing import resume_metadata, training_checkpoints
from .columns import declare
from .metadata import metadata_table, peak_memory, png_markdown, progress_logger, table_metadata
from .seed_pool import SEED_POOL
from .shared import artifact_folders, latest_rows, provenance_columns

POLICY = POLICY_TABLE
TRANSITIONS = TRANSITIONS_TABLE
COMPARISON = "teams_policy_comparison"
EVOLVED = "teams_evolved_instructions"
EXPERT_PAIRS = "teams_instruction_pairs"
COMPARISON_CHECK = "teams_policy_beats_uniform"

_STATE = "the instructor's state, coarsely: start, or after <operation> (rejected when that rewrite was)"
_OPERATION = f"the instruction operation applied at this step ({', '.join(OPERATION_NAMES)})"
# The columns of a chain step, in the three tables of chain steps (refine_af_pipeline/teams/evolution.py).
_CHAIN_STEP = {
    "seed_id": "id of the seed task the chain started from",
    "seed_instruction": "the seed task's instruction",
    "step": "position of the operation in its chain (1-based)",
    "state": _STATE,
    "operation": _OPERATION,
    "reward": "the reviewer's reward of the rewrite: P(differs), 0 where a rule fired",
    "p_differs": "the reviewer model's P(Yes) that the rewrite adds something; null where a rule decided",
    "rule": "the reviewer rule that zeroed the reward (empty_or_punctuation, refusal, identical, echo_of_request, "
    "leaked_prompt_words, copied_example, near_identical); null when the model judged",
    "rewrite_cached": "whether the rewrite came from the call cache (same model, prompt, sampling and seed)",
    "review_cached": "whether the judgement came from the call cache",
    "generation_tokens": "tokens the rewriter generated for the rewrite",
    "hit_token_limit": "whether the rewrite stopped at max_new_tokens",
    "model_id": "the rewriter (also the reviewer), by the name it was served as",
    "reviewer_version": "the reviewer's method, model, question and rules hash",
}
_POLICY_FILE = "the instructor's weights (sb3-contrib TRPO zip) in the artifact store"
COLUMNS = declare(
    {
        POLICY: {
            "update": "TRPO update of the instructor (1-based)",
            "episodes": "episodes in the update's rollout",
            "transitions": "operations applied in the update's rollout",
            "mean_reward": "mean reviewer reward over the update's operations",
            "rule_zero_share": "share of the update's operations a reviewer rule zeroed (0-1)",
            "entropy": "mean entropy of the instructor's action distribution over the states its rollout visited, "
            "after the update (nats)",
            "kl": "mean KL of the instructor's action distribution from before the update, over the states its "
            "rollout visited",
            **{f"share_{o}": f"share of the update's operations that were {o}" for o in OPERATION_NAMES},
            **{
                f"start_probability_{o}": f"the instructor's probability of {o} as the first operation, after the "
                "update"
                for o in OPERATION_NAMES
            },
            "policy_path": _POLICY_FILE,
            "reviewer_version": _CHAIN_STEP["reviewer_version"],
            "settings": "the instructor's settings as JSON, which the stages after it follow",
        },
        f"{POLICY}/last_update_choices_by_state": {
            "state": _STATE,
            **{o: f"times the policy chose {o} in the state during its last update" for o in OPERATION_NAMES},
        },
        TRANSITIONS: {
            **_CHAIN_STEP,
            "episode_env": "index of the episode slot in the batched environment",
            "observation": "the full state vector the instructor read (teams/state.py)",
            "before": "the instruction the operation was applied to",
            "after": "the rewritten instruction (first line of the rewriter's reply, cleaned)",
            "update": "TRPO update whose rollout made the transition (1-based)",
        },
        f"{TRANSITIONS}/mean_reward_by_operation": {
            "operation": "instruction operation",
            "mean_reward": "mean reviewer reward of the operation over the training transitions",
            "n": "training transitions that applied the operation",
        },
        COMPARISON: {
            **_CHAIN_STEP,
            "arm": "how operations were chosen: policy (the learned instructor, sampled), uniform (random, "
            "WizardLM's choice) or fixed:<operation> (the operation with the best training reward)",
            "before": "the instruction the operation was applied to",
            "after": "the rewritten instruction (first line of the rewriter's reply, cleaned)",
            "policy_path": _POLICY_FILE,
        },
        f"{COMPARISON}/policy_operation_shares": {
            "operation": "instruction operation",
            "proportion": "share of the policy arm's steps that applied it (0-1)",
        },
        f"{COMPARISON}/headroom_by_state": {
            "state": _STATE,
            "state_transitions": "training transitions in the state",
            "best_operation": "operation with the best mean reward in the state (at least 3 transitions)",
            "best_mean_reward": "its mean reward",
            **{
                f"mean_reward_{o}": f"mean reward of {o} in the state (null: fewer than 3 transitions)"
                for o in OPERATION_NAMES
            },
        },
        f"{COMPARISON}/per_arm_mean_reward_by_step": {
            "arm": "how operations were chosen (policy, uniform, fixed:<operation>)",
            "step": "position of the operation in its chain (1-based)",
            "reward": "mean reviewer reward of the arm's operations at that step, over the held-out seed tasks",
        },
        EVOLVED: {
            **_CHAIN_STEP,
            "generation_tokens": "tokens the expert generated for the rewrite",
            "hit_token_limit": "whether the expert's rewrite stopped at max_new_tokens",
            "model_id": "the expert model that wrote the rewrite, by the name it was served as",
            "instruction_id": "id of the evolved instruction: teams-<seed id>-<step>",
            "instruction": "the instruction this step wrote",
            "previous_instruction": "the instruction the operation was applied to",
            "max_rouge_l": "highest ROUGE-L F-measure against the seed tasks and the instructions kept before it "
            "(0-1); null where an earlier filter decided",
            "filter_reason": "why the instruction was dropped (a reviewer rule, no_information_gain, a Self-Instruct "
            "filter, near_duplicate); null when kept",
            "keep": "whether the instruction passed every filter and goes to the expert for an answer",
            "policy_path": _POLICY_FILE,
        },
        EXPERT_PAIRS: {
            "instance_id": "the evolved instruction's id (one answer per instruction)",
            "instruction_id": "id of the evolved instruction: teams-<seed id>-<step>",
            "input": "always empty: an evolved instruction carries its input inside",
            "output": "the expert's answer",
            "generation_tokens": "tokens the expert generated for the answer",
            "hit_token_limit": "whether the answer stopped at max_new_tokens",
            "parse_status": "always ok: the whole answer is the output",
            "filter_reason": "why the pair was filtered out (a gate reason, conflicting_outputs_for_same_input); "
            "null when kept",
            "keep": "whether the pair passed the instance gate and the filters and enters SFT's draw",
            "model_id": "the expert model, by the name it was served as",
            "seed_id": "id of the seed task the instruction's chain started from",
            "operation": "the operation whose rewrite the instruction is",
            "step": "position of that operation in its chain (1-based)",
        },
    }
)


class InstructorConfig(dg.Config, InstructorSettings):
    """Run config of `teams_operation_policy`: the fields of InstructorSettings
    (refine_af_pipeline/teams/instructor.py)."""


class PolicyComparisonConfig(dg.Config, PolicyComparisonSettings):
    """Run config of `teams_policy_comparison`: the fields of PolicyComparisonSettings
    (refine_af_pipeline/teams/settings.py)."""


class EvolvedInstructionsConfig(dg.Config, EvolvedInstructionsSettings):
    """Run config of `teams_evolved_instructions`: the fields of EvolvedInstructionsSettings
    (refine_af_pipeline/teams/settings.py)."""


class ExpertAnswerConfig(dg.Config, ExpertAnswerSettings):
    """Run config of `teams_instruction_pairs`: the fields of ExpertAnswerSettings
    (refine_af_pipeline/teams/settings.py)."""


def _seed_pool(warehouse: Warehouse) -> pl.DataFrame:
    df = warehouse.read_table(SEED_POOL)
    if df is None or df.height == 0:
        raise dg.Failure("seed_pool is empty or missing: materialize seed_pool first")
    return df


def _trained_policy(warehouse: Warehouse) -> TrainedPolicy:
    """The policy the latest run of teams_operation_policy trained, its settings and reviewer, read
    from its table in this data folder (never from the Dagster instance)."""
    run_id, rows = latest_rows(warehouse, POLICY, HANDED_OVER)
    [policy_file] = artifact_folders(warehouse, POLICY, run_id, [rows["policy_path"][-1]], "policy file")
    try:
        return TrainedPolicy.from_rows(rows, policy_file)
    except ValueError as err:
        raise dg.Failure(str(err)) from err


def _fail_on(conflict: str | None) -> None:
    if conflict:
        raise dg.Failure(conflict)


def _open_expert_and_reviewer(
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


@dg.multi_asset(
    name=POLICY,
    group_name=groups.TEAMS_RL,
    pool="gpu",
    can_subset=False,
    specs=[
        dg.AssetSpec(
            POLICY,
            deps=[SEED_POOL],
            kinds={"duckdb", "pytorch"},
            description=(
                "TeaMs-RL's instructor: a TRPO policy (sb3-contrib, an MLP over the chain's state: previous operation, "
                "step, whether the last rewrite was rejected, features of the instruction; teams/state.py) "
                "that picks the next of six rewrite operations; the reward is the reviewer's P(the rewrite adds "
                "something). Weights in the artifact store; the table is the log per update (mean reward, entropy, "
                "KL, action shares), each row with the policy file, the reviewer and the settings the stages after "
                "it follow."
            ),
        ),
        dg.AssetSpec(
            TRANSITIONS,
            deps=[SEED_POOL],
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
    train, held = split_seed_tasks(_seed_pool(warehouse), config.heldout_share)
    if not train:
        raise dg.Failure(f"heldout_share {config.heldout_share} holds out every seed task; lower it")
    queries = QueryCounter()
    base = language_model.open_models({"base": None})["base"]
    _log_training_plan(context, config, base, len(train), len(held))
    started = time.monotonic()
    with CallCache.in_folder(artifact_store.root) as cache:
        stepper, reviewer = build_stepper(
            queries.wrap(base, "rewriter"),
            queries.wrap(base, "reviewer"),
            config,
            language_model.generation_batch_size(config.generation_batch_size),
            language_model.scoring_batch_size,
            cache,
        )
        env = BatchedEvolutionVecEnv(
            train, config.operations, config.horizon, stepper, config.episodes_per_update, seed=config.seed
        )
        checkpoints = training_checkpoints(
            context,
            artifact_store,
            POLICY,
            config.checkpoint_every_updates,
            settings=config.model_dump(exclude={"checkpoint_every_updates"}),
            seeds=train,
            model=base.provenance.columns(),
            reviewer=reviewer.version,
        )
        result = train_instructor(env, config, _update_logger(context, config, started), checkpoints)
    policy_path = save_policy(result.model, artifact_store.run_dir(POLICY, context.run_id) / "instructor_trpo")
    log = policy_log_frame(result.log, policy_path, reviewer.version, config, context.run_id, queries.as_json())
    transitions = policy_transitions_frame(
        env.transitions,
        config.horizon,
        config.episodes_per_update,
        **provenance_columns(base.provenance),
        reviewer_version=reviewer.version,
        run_id=context.run_id,
    )
    with warehouse.transaction() as conn:
        insert_rows(conn, POLICY, log, mode="replace")
        insert_rows(conn, TRANSITIONS, transitions, mode="replace")

    yield dg.MaterializeResult(asset_key=TRANSITIONS, metadata=_transitions_metadata(transitions))
    yield dg.MaterializeResult(
        asset_key=POLICY,
        metadata={
            **_policy_metadata(config, log, result.log, transitions, policy_path, reviewer.version),
            "train_seed_tasks": len(train),
            "heldout_seed_tasks": len(held),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "llm_queries": queries.as_json(),
            "train_seconds": round(time.monotonic() - started, 1),
            **resume_metadata(result.resumed_from_update, result.updates_taken, "update"),
            **peak_memory(language_model.resolved_device()),
        },
    )


def _log_training_plan(
    context: dg.AssetExecutionContext, config: InstructorConfig, base: ServedModel, n_train: int, n_held: int
) -> None:
    """Logs the instructor's training plan: updates, episodes, horizon, seed tasks and the base model."""
    context.log.info(
        f"TeaMs-RL instructor: {config.updates} TRPO updates x {config.episodes_per_update} episodes x "
        f"{config.horizon} operations on {n_train} training seed tasks ({n_held} held out), "
        f"{base.provenance.served_model} ({base.provenance.backend})"
    )


def _update_logger(context: dg.AssetExecutionContext, config: InstructorConfig, started: float):
    """A callback for train_instructor: logs each TRPO update's mean reward, entropy, KL and elapsed time."""

    def on_update(row):
        context.log.info(
            f"{POLICY} update {row['update']}/{config.updates}: mean reward {row['mean_reward']:.3f}, "
            f"entropy {row['entropy']:.3f}, kl {row['kl']:.4f}, {time.monotonic() - started:.0f} s elapsed"
        )

    return on_update


def _transitions_metadata(transitions: pl.DataFrame) -> dict:
    """The transitions table's metadata: the table, mean reward by operation, rule zeros, cache share."""
    by_op = transitions.group_by("operation").agg(pl.col("reward").mean().alias("mean_reward"), pl.len().alias("n"))
    return {
        **table_metadata(transitions, ["update", "step", "operation", "after", "reward", "rule"], table=TRANSITIONS),
        "mean_reward_by_operation": metadata_table(
            by_op.sort("operation"), table=f"{TRANSITIONS}/mean_reward_by_operation"
        ),
        "rule_zero_counts": json.dumps(dict(Counter(r for r in transitions["rule"].to_list() if r))),
        "cached_rewrite_share": float(transitions["rewrite_cached"].mean()),
    }


def _last_update_choices(transitions: pl.DataFrame) -> pl.DataFrame:
    """Times the policy chose each operation in each coarse state during its last update."""
    last = transitions.filter(pl.col("update") == pl.col("update").max())
    return last.group_by("state", "operation").len().pivot(on="operation", index="state", values="len").fill_null(0)


def _training_charts(log: pl.DataFrame, operations: list[str]) -> dict:
    """The instructor's training curves (mean reward, entropy, KL, rule zeros) and operation shares per update."""
    return {
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
                {o: log[f"share_{o}"].to_list() for o in operations},
                "operation shares per rollout",
                xlabel="update",
            ),
            "action shares",
        ),
    }


def _policy_metadata(
    config: InstructorConfig,
    log: pl.DataFrame,
    updates: list[dict],
    transitions: pl.DataFrame,
    policy_path: Path,
    reviewer_version: str,
) -> dict:
    """The policy's metadata from its training (`updates`: train_instructor's log): log, file, curves, figures."""
    final = updates[-1]
    return {
        **table_metadata(log, ["update", "mean_reward", "entropy", "kl"], table=POLICY),
        "policy_path": dg.MetadataValue.path(str(policy_path)),
        "settings": settings_json(config),
        "reviewer_version": reviewer_version,
        **_training_charts(log, config.operations),
        "last_update_choices_by_state": metadata_table(
            _last_update_choices(transitions).sort("state"), table=f"{POLICY}/last_update_choices_by_state"
        ),
        **{f"final_share_{o}": float(final[f"share_{o}"]) for o in config.operations},
        "first_mean_reward": float(updates[0]["mean_reward"]),
        "final_mean_reward": float(final["mean_reward"]),
        "final_entropy": float(final["entropy"]),
    }


@dg.asset(
    group_name=groups.TEAMS_RL,
    kinds={"duckdb", "pytorch"},
    deps=[POLICY, TRANSITIONS, SEED_POOL],
    pool="gpu",
    check_specs=[
        dg.AssetCheckSpec(
            COMPARISON_CHECK,
            asset=COMPARISON,
            description=(
                "Warns (never fails) unless the learned policy beats uniform-random operations on held-out seed "
                "tasks: the low end of the paired bootstrap 95% CI of the per-seed mean reward difference must be "
                "above 0; otherwise it says 'cannot tell' (or 'no') with the effect, its CI and n."
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
    (arm, seed task, step); the paired bootstrap CI of the per-seed mean reward in the metadata.
    The held-out split, operations, horizon, rewrite sampling and reviewer are the policy's."""
    trained = _trained_policy(warehouse)
    settings = trained.settings
    transitions = _training_transitions(warehouse, trained)
    held = _heldout_seed_tasks(warehouse, settings, config)
    best = best_fixed_operation(transitions, settings.operations)
    arms = comparison_arms(trained.load(), settings.operations, settings.horizon, best)
    queries = QueryCounter()
    base = language_model.open_models({"base": None})["base"]
    report = progress_logger(context, COMPARISON)
    started = time.monotonic()
    with CallCache.in_folder(artifact_store.root) as cache:
        stepper, reviewer = build_stepper(
            queries.wrap(base, "rewriter"),
            queries.wrap(base, "reviewer"),
            settings,
            language_model.generation_batch_size(config.generation_batch_size),
            language_model.scoring_batch_size,
            cache,
        )
        _fail_on(trained.reviewer_conflict(COMPARISON, reviewer.version))
        rows = run_chains(
            stepper,
            held,
            arms,
            settings.horizon,
            config.seed,
            settings.operations,
            progress=lambda d, t: report(d, t, time.monotonic() - started),
        )
    df = transition_frame(
        rows,
        policy_path=trained.policy_file,
        **provenance_columns(base.provenance),
        reviewer_version=reviewer.version,
        llm_queries=queries.as_json(),  # this run's model queries (a cache hit is none), for the query ledger
        run_id=context.run_id,
    )
    warehouse.write_table(COMPARISON, df)

    outcome = compare_arms(df, best, transitions, settings.operations, config.bootstrap_resamples, config.seed)
    figures = {**outcome.figures(), "reviewer_version": reviewer.version, **outcome.headroom_figures()}
    conclusion = _policy_beats_uniform(outcome, config.min_seeds)
    if not conclusion.passed:
        context.log.warning(f"{COMPARISON_CHECK}: {conclusion.description}")
    return dg.MaterializeResult(
        metadata={
            **_comparison_metadata(df, outcome, figures),
            **_queries_and_cache(queries, cache, language_model.resolved_device()),
        },
        check_results=[_comparison_check(conclusion, figures, config.min_seeds)],
    )


def _training_transitions(warehouse: Warehouse, trained: TrainedPolicy) -> pl.DataFrame | None:
    """The instructor's training transitions; fails unless they are from the run that trained `trained`."""
    transitions = warehouse.read_table(TRANSITIONS)
    _fail_on(trained.transitions_conflict([] if transitions is None else transitions["run_id"].to_list()))
    return transitions


def _heldout_seed_tasks(
    warehouse: Warehouse, settings: InstructorSettings, config: PolicyComparisonConfig
) -> list[SeedTask]:
    """The comparison's sample of the policy's held-out seed tasks; fails with fewer than two."""
    _, held = split_seed_tasks(_seed_pool(warehouse), settings.heldout_share)
    held = sample_seed_tasks(held, config.max_seeds, config.seed)
    if len(held) < 2:
        raise dg.Failure(
            f"only {len(held)} held-out seed task(s) at heldout_share {settings.heldout_share}; "
            f"raise it in {POLICY}'s config"
        )
    return held


def _policy_beats_uniform(outcome: ArmComparison, min_seeds: int) -> Conclusion:
    """The check's answer: the paired CI of the policy's mean reward per step minus uniform's."""
    return paired_conclusion(
        "the TeaMs-RL policy beats uniform operations",
        outcome.vs_uniform,
        unit="reviewer reward per step",
        min_n=min_seeds,
        n_unit="held-out seed tasks",
    )


def _comparison_metadata(df: pl.DataFrame, outcome: ArmComparison, figures: dict) -> dict:
    """The comparison's metadata: table, figures, policy operation shares, headroom, arm mean reward by step."""
    shares = df.filter(pl.col("arm") == "policy")["operation"].value_counts(normalize=True).sort("operation")
    return {
        **table_metadata(df, ["arm", "seed_id", "step", "operation", "reward"], table=COMPARISON),
        **figures,
        "policy_operation_shares": metadata_table(shares, table=f"{COMPARISON}/policy_operation_shares"),
        "headroom_by_state": metadata_table(
            pl.DataFrame(outcome.room.per_state), table=f"{COMPARISON}/headroom_by_state"
        )
        if outcome.room.per_state
        else "none",
        "per_arm_mean_reward_by_step": metadata_table(
            df.group_by("arm", "step").agg(pl.col("reward").mean()).sort("arm", "step"),
            table=f"{COMPARISON}/per_arm_mean_reward_by_step",
        ),
    }


def _comparison_check(conclusion: Conclusion, figures: dict, min_seeds: int) -> dg.AssetCheckResult:
    """The result of teams_policy_beats_uniform: a warning unless the policy beats uniform operations."""
    return dg.AssetCheckResult(
        check_name=COMPARISON_CHECK,
        passed=conclusion.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=conclusion.description,
        metadata={
            **figures,
            **conclusion.metadata(),
            "rule": "passes when the low end of the paired bootstrap CI of the policy's mean reward per step "
            "minus uniform's is above 0" + (f", on at least {min_seeds} held-out seed tasks" if min_seeds else ""),
        },
    )


def _queries_and_cache(queries: QueryCounter, cache: CallCache, device: str) -> dict:
    """This run's model queries, the call cache's hits and misses, and the peak memory."""
    return {
        "llm_queries": queries.as_json(),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        **peak_memory(device),
    }


@dg.asset(group_name=groups.TEAMS_RL, kinds={"duckdb", "pytorch"}, deps=[POLICY, SEED_POOL], pool="gpu")
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
    trained = _trained_policy(warehouse)
    settings = trained.settings
    seed_pool = _seed_pool(warehouse)
    seeds = sample_seed_tasks(seed_tasks(seed_pool), config.max_seeds, config.seed)
    chooser = policy_chooser(trained.load(), len(settings.operations), settings.horizon)
    queries = QueryCounter()
    expert, reviewer_model = _open_expert_and_reviewer(language_model, expert_model, queries)
    report = progress_logger(context, EVOLVED)
    started = time.monotonic()
    with CallCache.in_folder(artifact_store.root) as cache:
        stepper, reviewer = build_stepper(
            expert,
            reviewer_model,
            settings,
            expert_model.generation_batch_size(config.generation_batch_size),
            language_model.scoring_batch_size,
            cache,
        )
        _fail_on(trained.reviewer_conflict(EVOLVED, reviewer.version))
        rows = run_chains(
            stepper,
            seeds,
            {"policy": chooser},
            settings.horizon,
            config.seed,
            settings.operations,
            progress=lambda d, t: report(d, t, time.monotonic() - started),
            row=evolved_row,
        )
    rows = keep_decisions(rows, seed_pool["instruction"].to_list(), config.min_p_differs, config.rouge_threshold)
    df = evolved_frame(
        rows,
        policy_path=trained.policy_file,
        **provenance_columns(expert.provenance),
        reviewer_version=reviewer.version,
        llm_queries=queries.as_json(),  # this run's model queries (a cache hit is none), for the query ledger
        run_id=context.run_id,
    )
    warehouse.write_table(EVOLVED, df)

    return dg.MaterializeResult(
        metadata={
            **_evolved_metadata(df, len(seeds), reviewer.version),
            **_queries_and_cache(queries, cache, language_model.resolved_device()),
        }
    )


def _evolved_metadata(df: pl.DataFrame, n_seeds: int, reviewer_version: str) -> dict:
    """The evolved instructions' metadata: the table, counts, filter decisions, mean reward, operation shares."""
    shares = df["operation"].value_counts(normalize=True).sort("operation")
    return {
        **table_metadata(df, ["seed_id", "step", "operation", "instruction", "reward", "keep"], table=EVOLVED),
        "seed_tasks": n_seeds,
        "evolved_instructions": df.height,
        "kept_instructions": int(df["keep"].sum()),
        "decisions": json.dumps(dict(Counter(r or "kept" for r in df["filter_reason"].to_list()))),
        "mean_reward": float(df["reward"].mean()),
        "operation_shares": json.dumps(
            {o: round(v, 4) for o, v in zip(shares["operation"].to_list(), shares["proportion"].to_list())}
        ),
        "reviewer_version": reviewer_version,
    }


@dg.asset(group_name=groups.TEAMS_RL, kinds={"duckdb", "pytorch"}, deps=[EVOLVED], pool="gpu")
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
    evolved = warehouse.read_table(EVOLVED)
    if evolved is None or evolved.filter(pl.col("keep")).height == 0:
        raise dg.Failure(
            "teams_evolved_instructions has no kept instructions to answer; materialize it again with more "
            "seed tasks, or lower min_p_differs"
        )
    kept = evolved.filter(pl.col("keep")).select("instruction_id", "instruction", "seed_id", "operation", "step")
    kept = sample_rows(kept, config.max_instructions, config.seed)
    queries = QueryCounter()
    expert = queries.wrap(expert_model.open_models({"expert": None})["expert"], "expert")
    params = config.sampling_params()
    batch_size = expert_model.generation_batch_size(config.generation_batch_size)
    report = progress_logger(context, EXPERT_PAIRS, batch_size * params.max_new_tokens)
    started = time.monotonic()
    with expert.for_generation() as model:
        answers = model.generate(
            [render_prompt(expert.tokenizer, i) for i in kept["instruction"].to_list()],
            params,
            batch_size,
            config.seed,
            lambda d, t, s: report(d, t, time.monotonic() - started),
        )
    df = expert_answer_frame(
        kept,
        answers,
        feedback_scorer.gate(),
        **provenance_columns(expert.provenance),
        sampling_params=json.dumps(params.as_dict()),
        llm_queries=queries.as_json(),  # this run's model queries, for the query ledger
        run_id=context.run_id,
    )
    warehouse.write_table(EXPERT_PAIRS, df)

    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["instruction", "output", "keep"], table=EXPERT_PAIRS),
            "kept_pairs": int(df["keep"].sum()),
            "filter_reasons": json.dumps(dict(Counter(r or "kept" for r in df["filter_reason"].to_list()))),
            "share_cut_at_token_limit": float(df["hit_token_limit"].mean()),
            "expert_model": expert.provenance.served_model,
            "llm_queries": queries.as_json(),
            **peak_memory(expert_model.resolved_device()),
        }
    )
