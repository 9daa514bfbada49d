import subprocess
import sys

import dagster as dg

from refine_af_pipeline.definitions import defs

STAGES = ["seed_pool", "raw_instructions", "deduplicated_instructions", "reward_scores", "rl_refined_policy",
          "instance_output_pairs", "finetuned_model", "evaluation"]


def test_definitions_hold_the_eight_stages_in_one_chain():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(STAGES)
    for upstream, downstream in zip(STAGES, STAGES[1:]):
        assert dg.AssetKey(upstream) in graph.get(dg.AssetKey(downstream)).parent_keys


def test_model_assets_share_the_gpu_pool():
    graph = defs.resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys()}
    assert all(pools[s] == {"gpu"} for s in STAGES[1:])


def test_schedule_targets_the_whole_job_and_starts_stopped():
    schedule = defs.get_schedule_def("refine_af_regeneration")
    assert schedule.job_name == "refine_af_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    job = defs.resolve_job_def("refine_af_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == set(STAGES)
    with dg.build_schedule_context() as context:
        requests = schedule.evaluate_tick(context).run_requests
    assert len(requests) == 1


def test_cli_validates_the_code_location():
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-m",
                             "refine_af_pipeline.definitions"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Validation successful" in result.stdout + result.stderr
