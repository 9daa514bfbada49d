import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from pipeline_helpers import STAGES_BEFORE_RL

from refine_af_pipeline.definitions import defs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent

# Shared stages, then the REFINE-AF branch (RL policy writes the instances) beside the Self-Instruct
# baseline branch (the base model writes them), joined again by the evaluation and the exports.
SHARED = STAGES_BEFORE_RL
REFINE_AF = ["rl_refined_policy", "instance_output_pairs", "finetuned_model"]
SELF_INSTRUCT = ["selfinstruct_instance_pairs", "selfinstruct_finetuned_model"]
BEST_OF_N = ["bestofn_instance_pairs", "bestofn_finetuned_model"]
TEAMS = [
    "teams_operation_policy",
    "teams_policy_transitions",
    "teams_policy_comparison",
    "teams_evolved_instructions",
    "teams_instruction_pairs",
    "teams_finetuned_model",
]
EVALUATION = ["evaluation", "evaluation_predictions", "evaluation_summary"]
STAGES = (
    SHARED
    + REFINE_AF
    + ["rl_heldout_comparison"]
    + SELF_INSTRUCT
    + BEST_OF_N
    + TEAMS
    + ["sft_training_pairs", "training_data_audit"]
    + EVALUATION
    + ["llm_query_ledger", "rl_verdict", "instruction_dataset_exports"]
)
MODEL_STAGES = [
    s
    for s in STAGES
    if s not in ("seed_pool", "instruction_dataset_exports", "llm_query_ledger", "sft_training_pairs", "rl_verdict")
]


def _parents(graph, name: str) -> set[str]:
    return {k.to_user_string() for k in graph.get(dg.AssetKey(name)).parent_keys}


def test_definitions_hold_both_branches_evaluation_and_exports():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(STAGES)
    # One step writes the three bootstrap tables (a DAG, not a loop through its own downstream), one
    # the scores and their standardisation, one the three evaluation tables. Every reader of the kept
    # instructions reads instruction_pool too: it names the pool they read.
    assert _parents(graph, "raw_instructions") == {"seed_pool"}
    assert _parents(graph, "deduplicated_instructions") == {"seed_pool", "raw_instructions"}
    assert _parents(graph, "instruction_pool") == {"seed_pool"}
    assert _parents(graph, "reward_model") == {"seed_pool"}
    assert _parents(graph, "reward_scores") == {"instruction_pool", "deduplicated_instructions", "reward_model"}
    assert _parents(graph, "reward_standardisation") == {"reward_scores"}
    for stage in ("rl_refined_policy", "selfinstruct_instance_pairs", "bestofn_instance_pairs"):
        assert _parents(graph, stage) == {
            "reward_standardisation",
            "instruction_pool",
            "deduplicated_instructions",
            "reward_model",
        }
    # The branches differ only in the policy: the baseline never reads the RL adapter.
    assert _parents(graph, "instance_output_pairs") == {
        "rl_refined_policy",
        "reward_standardisation",
        "instruction_pool",
        "deduplicated_instructions",
        "reward_model",
    }
    assert _parents(graph, "rl_heldout_comparison") == {
        "rl_refined_policy",
        "reward_standardisation",
        "instruction_pool",
        "deduplicated_instructions",
        "reward_model",
    }
    # Every arm's SFT reads its equal-sized draw; the draw reads every arm's kept pairs.
    assert _parents(graph, "sft_training_pairs") == {
        "instance_output_pairs",
        "selfinstruct_instance_pairs",
        "bestofn_instance_pairs",
        "teams_instruction_pairs",
    }
    for model in (
        "finetuned_model",
        "selfinstruct_finetuned_model",
        "bestofn_finetuned_model",
        "teams_finetuned_model",
    ):
        assert _parents(graph, model) == {"sft_training_pairs"}
    for table in EVALUATION:
        assert _parents(graph, table) == {
            "finetuned_model",
            "selfinstruct_finetuned_model",
            "bestofn_finetuned_model",
            "teams_finetuned_model",
        }
    assert _parents(graph, "instruction_dataset_exports") == {
        "instance_output_pairs",
        "selfinstruct_instance_pairs",
        "teams_instruction_pairs",
    }
    # TeaMs-RL starts from the seed tasks alone; each of its tables reads only what it declares.
    for table in ("teams_operation_policy", "teams_policy_transitions"):
        assert _parents(graph, table) == {"seed_pool"}
    assert _parents(graph, "teams_policy_comparison") == {
        "teams_operation_policy",
        "teams_policy_transitions",
        "seed_pool",
    }
    assert _parents(graph, "teams_evolved_instructions") == {"teams_operation_policy", "seed_pool"}
    assert _parents(graph, "teams_instruction_pairs") == {"teams_evolved_instructions"}
    assert _parents(graph, "llm_query_ledger") == {
        "raw_instructions",
        "reward_model",
        "reward_scores",
        "rl_refined_policy",
        "rl_heldout_comparison",
        "instance_output_pairs",
        "selfinstruct_instance_pairs",
        "bestofn_instance_pairs",
        "teams_operation_policy",
        "teams_policy_comparison",
        "teams_evolved_instructions",
        "teams_instruction_pairs",
        "training_data_audit",
        "evaluation",
    }
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert {
        ("evaluation_summary", "refine_af_beats_self_instruct"),
        ("rl_heldout_comparison", "policy_beats_base_on_heldout"),
        ("teams_policy_comparison", "teams_policy_beats_uniform"),
        ("sft_training_pairs", "every_arm_has_its_pairs"),
        ("rl_verdict", "every_question_answered"),
    } <= checks
    assert _parents(graph, "rl_verdict") == {
        "rl_heldout_comparison",
        "training_data_audit",
        "evaluation",
        "teams_policy_comparison",
        "sft_training_pairs",
        "llm_query_ledger",
    }
    assert _parents(graph, "training_data_audit") == {"sft_training_pairs"}


def test_every_generation_step_sets_its_own_batch_in_its_config():
    # The steps that call generate; the language_model resource's batch_size is the default of each.
    generating = {
        "bootstrap_instructions",
        "reward_model",
        "reward_scores",
        "rl_heldout_comparison",
        "instance_output_pairs",
        "selfinstruct_instance_pairs",
        "bestofn_instance_pairs",
        "teams_operation_policy",
        "teams_policy_comparison",
        "teams_evolved_instructions",
        "teams_instruction_pairs",
        "evaluation",
    }
    job = defs.resolve_job_def("refine_af_job")
    defaults = dg.validate_run_config(job, {})["ops"]
    with_field = {op for op, section in defaults.items() if "generation_batch_size" in (section.get("config") or {})}
    assert with_field == generating
    assert all(defaults[op]["config"]["generation_batch_size"] == 0 for op in generating)


def test_model_assets_share_the_gpu_pool():
    graph = defs.resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys()}
    assert all(pools[s] == {"gpu"} for s in MODEL_STAGES), pools
    assert not pools["instruction_dataset_exports"]  # writes files only: no reason to wait for the GPU


def test_schedule_targets_the_whole_job_and_starts_stopped():
    schedule = defs.get_schedule_def("refine_af_regeneration")
    assert schedule.job_name == "refine_af_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def("refine_af_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == set(STAGES)
    # The tick itself (run key, run config) is tested in test_operations.py.
    with dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 24, 3, tzinfo=UTC)) as context:
        requests = schedule.evaluate_tick(context).run_requests
    assert len(requests) == 1


def test_cli_validates_the_code_location():
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "refine_af_pipeline.definitions"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Validation successful" in result.stdout + result.stderr


# (op, field): the sizes whose defaults are the method's full-data scale (0 = all).
SCALE = [
    ("bootstrap_instructions", "num_prompts"),
    ("reward_scores", "max_instructions"),
    ("rl_refined_policy", "max_steps"),
    ("instance_output_pairs", "max_instructions"),
    ("selfinstruct_instance_pairs", "max_instructions"),
    ("evaluation", "instances_per_task"),
    ("teams_operation_policy", "updates"),
    ("teams_evolved_instructions", "max_seeds"),
]


@pytest.mark.parametrize("profile", ["demo", "experiment"])
def test_the_profiles_are_run_configs_that_make_every_full_data_size_small(profile):
    import yaml

    config = yaml.safe_load((ROOT / "configs" / f"{profile}.yaml").read_text())
    job = defs.resolve_job_def("refine_af_job")
    resolved = dg.validate_run_config(job, config)["ops"]
    defaults = dg.validate_run_config(job, {})["ops"]
    for op, field in SCALE:
        value, default = resolved[op]["config"][field], defaults[op]["config"][field]
        assert 0 < value and (default == 0 or value < default), (op, field, value, default)
    # Both branches are sized and trained alike, or the comparison is not like for like.
    ops = config["ops"]
    assert ops["instance_output_pairs"] == ops["selfinstruct_instance_pairs"]
    bestofn = dict(ops["bestofn_instance_pairs"]["config"])
    assert bestofn.pop("candidates_per_instance") > 1 and bestofn == ops["instance_output_pairs"]["config"]
    # Every arm's SFT settings are one section, sft_training_pairs' `sft`: the fine-tuned models take none.
    assert resolved["sft_training_pairs"]["config"]["sft"]["epochs"] > 0
    for tuned in (
        "finetuned_model",
        "selfinstruct_finetuned_model",
        "bestofn_finetuned_model",
        "teams_finetuned_model",
    ):
        assert tuned not in ops and not resolved.get(tuned, {}).get("config"), tuned


def test_make_run_passes_the_demo_profile_and_make_experiment_its_own():
    makefile = (ROOT / "Makefile").read_text()
    # `make run CONFIG=my.yaml` passes another file; the demo profile unless CONFIG is given.
    assert "CONFIG ?= configs/demo.yaml" in makefile
    assert "--select '*' -c $(CONFIG)" in makefile
    assert "--select '*' -c configs/experiment.yaml" in makefile


def test_steps_fork_from_a_preloaded_server_one_at_a_time_unless_the_run_config_says_otherwise():
    job = defs.resolve_implicit_global_asset_job_def()

    def executor_config(run_config):
        return dg.validate_run_config(job, run_config)["execution"]["multi_or_in_process_executor"]

    default = executor_config({})["multiprocess"]
    assert "torch" in default["start_method"]["forkserver"]["preload_modules"]
    assert default["max_concurrent"] == 1  # no polling for the "gpu" slot between steps
    wider = executor_config({"execution": {"config": {"multiprocess": {"max_concurrent": 3}}}})["multiprocess"]
    assert wider["max_concurrent"] == 3 and "forkserver" in wider["start_method"]
    assert executor_config({"execution": {"config": {"in_process": {}}}}) == {
        "in_process": {"retries": {"enabled": {}}}
    }
    spawned = executor_config(
        {"execution": {"config": {"multiprocess": {"start_method": {"spawn": {}}, "max_concurrent": 1}}}}
    )["multiprocess"]
    assert spawned["start_method"] == {"spawn": {}} and spawned["max_concurrent"] == 1
