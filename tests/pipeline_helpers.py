"""Materializing the whole graph into a temporary data directory, for the asset tests."""

import shutil
from pathlib import Path

import dagster as dg
from warehouse_recorder import RecordingWarehouse

from refine_af_pipeline.definitions import all_assets, all_checks, default_resources
from resources import FeedbackScorerResource, LanguageModelResource
from resources.training_launcher import TrainingLauncherResource

# Every asset the RL and instance stages read, in the graph's order: the pool's stages, then the
# reward model and the standardisation of its scores.
STAGES_BEFORE_RL = [
    "seed_pool",
    "raw_instructions",
    "deduplicated_instructions",
    "instruction_pool",
    "reward_model",
    "reward_scores",
    "reward_standardisation",
]


def smallest_run_config(**overrides) -> dict:
    """Per-asset config at the smallest sizes; `materialize` keeps the entries it selects."""
    ops = {
        "bootstrap_instructions": {"num_prompts": 8, "classification_prompts": 1, "max_new_tokens": 64},
        # The tiny model's instances pass the instance gate about one time in three: 16 and 12
        # instructions leave enough for the spread of each component and an SFT validation slice.
        "reward_model": {"max_new_tokens": 32, "max_seed_tasks": 60},
        "reward_scores": {"max_instructions": 16, "max_new_tokens": 32},
        "rl_refined_policy": {
            "max_steps": 2,
            "prompts_per_step": 2,
            "group_size": 2,
            "train_batch_size": 2,
            "max_completion_length": 24,
        },
        "rl_heldout_comparison": {"samples_per_instruction": 2, "max_new_tokens": 32, "bootstrap_resamples": 2000},
        # Two replicates: every arm's SFT and evaluation run twice, and the verdict bootstraps over them.
        "instance_output_pairs": {"max_instructions": 12, "max_new_tokens": 32, "replicates": 2},
        "sft_training_pairs": {"min_validation": 1, "sft": {"epochs": 2.0, "batch_size": 4, "max_length": 128}},
        "evaluation": {"instances_per_task": 1, "max_new_tokens": 8, "bootstrap_resamples": 2000},
        "teams_operation_policy": {"updates": 2, "episodes_per_update": 4, "horizon": 3, "max_new_tokens": 16},
        "teams_policy_comparison": {"max_seeds": 4, "bootstrap_resamples": 2000},
        # The tiny model's reviewer is noise: every rewrite no rule rejects is kept.
        "teams_evolved_instructions": {"max_seeds": 8, "min_p_differs": 0.0},
        "teams_instruction_pairs": {"max_new_tokens": 16},
    }
    for key, value in overrides.items():
        ops[key] = {**ops.get(key, {}), **value}
    # The Self-Instruct branch runs with the REFINE-AF branch's settings (as in make run) unless told otherwise.
    for baseline, refine_af in (
        ("selfinstruct_instance_pairs", "instance_output_pairs"),
        ("bestofn_instance_pairs", "instance_output_pairs"),
    ):
        ops[baseline] = {**ops[refine_af], **overrides.get(baseline, {})}
    ops["bestofn_instance_pairs"].setdefault("candidates_per_instance", 2)
    return ops


# op name -> the asset names it materializes (a multi-asset's op writes several).
_OP_ASSETS = {a.node_def.name: {k.to_user_string() for k in a.keys} for a in all_assets if a.is_executable}


def ops_for(run_config: dict, selection=None) -> dict:
    """The run config's `ops` section for the ops that materialize any selected asset."""
    selected = None if selection is None else set(selection)
    return {k: {"config": v} for k, v in run_config.items() if selected is None or _OP_ASSETS.get(k, {k}) & selected}


def instance_for(data_dir: Path) -> dg.DagsterInstance:
    """The Dagster instance that goes with a data directory: consecutive materializations into the
    same directory see each other's runs, as they do under one DAGSTER_HOME (the run history; the
    state is the directory's tables and artifacts, tests/test_data_copy.py)."""
    home = Path(data_dir) / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(tempdir=str(home))


def copy_data_dir(source: Path, target: Path) -> Path:
    """A copy of a materialized data directory (the DuckDB file, artifacts/ and the Dagster instance
    under dagster_home/), for a test that writes into it: a module's shared data stays as its fixture
    made it, so the tests that read it pass in any order."""
    shutil.copytree(source, target)
    return target


def materialize(
    data_dir: Path,
    model: str,
    run_config: dict,
    selection=None,
    batch_size: int = 8,
    raise_on_error: bool = True,
    record_file: Path | None = None,
    model_settings: dict | None = None,
    gate_settings: dict | None = None,
    training_launcher: dict | None = None,
) -> dg.ExecuteInProcessResult:
    """`record_file`: record every table each step reads and writes there (warehouse_recorder);
    `model_settings`: more fields of the language_model resource (a backend, its URLs ...);
    `gate_settings`: fields of the feedback_scorer's instance gate; `training_launcher`: fields of
    the training_launcher resource (in process unless given). The tiny random model rarely
    ends a generation, so unless a test says otherwise cut outputs pass: with the gate on, no
    instance would be left to train on."""
    resources = default_resources(data_dir)
    resources["feedback_scorer"] = FeedbackScorerResource(
        **({"gate_cut_outputs": model != "embedded"} | (gate_settings or {}))
    )
    if record_file is not None:
        resources["warehouse"] = RecordingWarehouse(
            database=resources["warehouse"].database, record_file=str(record_file)
        )
    resources["language_model"] = LanguageModelResource(
        model=model,
        device="cpu",
        batch_size=batch_size,
        **(model_settings or {}),
    )
    # TeaMs-RL's expert and the audit judge are the base model unless a test says otherwise.
    resources["expert_model"] = resources["language_model"]
    resources["audit_model"] = resources["language_model"]
    resources["training_launcher"] = TrainingLauncherResource(**(training_launcher or {}))
    ops = ops_for(run_config, selection)
    with instance_for(data_dir) as instance:
        return dg.materialize(
            [*all_assets, *all_checks],
            resources=resources,
            run_config=dg.RunConfig(ops=ops),
            selection=selection,
            raise_on_error=raise_on_error,
            instance=instance,
        )
