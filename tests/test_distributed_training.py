"""Training with torch.distributed: two torchrun processes (gloo, CPU) on the tiny model, SFT and
GRPO, against one process with the same global batch; the launcher through Dagster Pipes; the
guard that ends an orphaned torchrun; and a world size larger than the machine.

Tolerance: the two-process run computes the same per-step arithmetic (the same examples per step,
the same rollouts: each row draws from its own seeded stream, training/rollouts.py), summed in
another order across processes, so per-step losses and rewards agree within 1e-4; the adapters of
the two runs differ in their last bits and are not compared.

TRL logs GRPO's KL and entropy as the mean, over a step's passes, of each pass's token-weighted
mean. With gradient accumulation the passes hold different completions in one process and in two,
so where completions differ in length those two figures differ between the runs (by 2e-4 KL on one
CI machine) although the training is the same. They are compared where a step is one pass in both
runs; the accumulating run is compared on the figures that do not depend on the grouping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import copy_data_dir, instance_for, materialize, smallest_run_config
from training_child import INSTRUCTIONS  # the prompts the kill/resume runs train on

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4


def _spec(kind: str, model_dir: Path, folder: Path, train_batch_size: int | None = None) -> dict:
    common = {
        "kind": kind,
        "model": {"path": str(model_dir), "model_id": "tiny", "local_only": True},
        "device": "cpu",
        "output_dir": str(folder / "run"),
        "result": str(folder / "result.json"),
    }
    if kind == "sft":
        triples = [[i, "", f"An answer about {i.lower()}."] for i in INSTRUCTIONS * 2]
        settings = {"epochs": 2, "batch_size": 4, "train_batch_size": 1, "max_length": 64, "checkpoint_every_steps": 0}
        return common | {"settings": settings, "train": triples, "validation": triples[:2]}
    from learned_reward_fixture import write_learned_reward

    settings = {
        "max_steps": 3,
        "prompts_per_step": 2,
        "group_size": 4,
        "train_batch_size": train_batch_size or 2,
        "max_completion_length": 12,
        "checkpoint_every_steps": 0,
    }
    return common | {
        "settings": settings,
        "instructions": INSTRUCTIONS,
        "is_classification": [False] * len(INSTRUCTIONS),
        "feedback_scorer": {"gate_cut_outputs": False},
        "stats": None,
        "scoring_batch_size": 8,
        "max_batch_tokens": 32768,
        "learned_reward_dir": str(write_learned_reward(folder / "learned_reward")),
    }


def _train(
    kind: str, model_dir: Path, folder: Path, processes: int, train_batch_size: int | None = None
) -> tuple[dict, list[dict]]:
    """The worker on `spec` as `processes` torchrun processes (1: plain python, no torchrun)."""
    folder.mkdir(parents=True)
    spec_file = folder / "spec.json"
    spec_file.write_text(json.dumps(_spec(kind, model_dir, folder, train_batch_size)))
    worker = ["-m", "refine_af_pipeline.training.torchrun_worker", str(spec_file)]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *launch, *worker], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]
    return json.loads((folder / "result.json").read_text()), ranks


def _same_training(one: dict, two: dict, ranks: list[dict], expected_steps: int, keys: tuple[str, ...]) -> None:
    assert one["world_size"] == 1 and two["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    assert two["steps_taken"] == one["steps_taken"] == expected_steps
    assert [r["steps_taken"] for r in ranks] == [expected_steps] * 2
    # DDP: both processes hold the same adapter at the end.
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"]
    # Only the main process wrote the adapter.
    assert (Path(two["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert [s["step"] for s in two["log"]] == [s["step"] for s in one["log"]]
    for key in keys:
        assert [s[key] for s in two["log"]] == pytest.approx([s[key] for s in one["log"]], abs=TOLERANCE), key


def test_two_processes_fine_tune_what_one_process_fine_tunes(tiny_model_dir, tmp_path):
    """SFT, 12 pairs in batches of 4 for 2 epochs: 4 passes a step in one process, 2 in each of two."""
    one, _ = _train("sft", tiny_model_dir, tmp_path / "one", 1)
    two, ranks = _train("sft", tiny_model_dir, tmp_path / "two", 2)
    _same_training(one, two, ranks, 6, ("loss",))


# Figures that are means over a step's completions or tokens, whatever the passes hold.
GROUPING_FREE = ("loss", "reward", "gate_failure_share", "learned_reward_mean", "completion_length", "clipped_share")


def test_two_processes_train_the_policy_one_process_trains(tiny_model_dir, tmp_path):
    """GRPO, 3 steps of 2 prompts x 4 completions. One pass a step in one process (8 completions) and
    in each of two (4 each): every logged figure agrees, KL and entropy included. Two passes a step
    in each of two processes (gradient accumulation): the figures that do not depend on the grouping."""
    one, _ = _train("rl", tiny_model_dir, tmp_path / "one", 1, train_batch_size=8)
    two, ranks = _train("rl", tiny_model_dir, tmp_path / "two", 2, train_batch_size=4)
    _same_training(one, two, ranks, 3, (*GROUPING_FREE, "kl", "entropy"))
    assert any(s["kl"] > 0 for s in one["log"])  # the policy moved off the reference: KL is compared, not zeros
    # Each process judged half of every step's completions; the step's count is their sum.
    assert two["judge_queries"] == one["judge_queries"] > 0
    accumulated, ranks = _train("rl", tiny_model_dir, tmp_path / "accumulated", 2, train_batch_size=2)
    _same_training(one, accumulated, ranks, 3, GROUPING_FREE)
    assert accumulated["judge_queries"] == one["judge_queries"]


def test_torchrun_through_dagster_pipes(upstream_of_instances, tiny_model_dir, tmp_path):
    """rl_refined_policy with the torchrun launcher: the step starts two processes through Pipes, their
    log lines reach the run's log, and the step on the head writes the table."""
    data_dir = copy_data_dir(upstream_of_instances, tmp_path / "data")
    result = materialize(
        data_dir,
        str(tiny_model_dir),
        smallest_run_config(rl_refined_policy={"max_steps": 2}),
        selection=["rl_refined_policy"],
        training_launcher={"launcher": "torchrun", "processes": 2},
    )
    [materialization] = result.asset_materializations_for_node("rl_refined_policy")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["training_processes"] == 2 and metadata["steps_taken_this_run"] == 2
    with instance_for(data_dir) as instance:
        lines = [e.user_message or "" for e in instance.all_logs(result.run_id)]
    assert any("RL step 2/2" in line and "(2 processes)" in line for line in lines), lines[-20:]
    import duckdb

    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        rows = conn.execute("SELECT step, run_id FROM rl_refined_policy ORDER BY step").fetchall()
    assert rows == [(1, result.run_id), (2, result.run_id)]


def test_more_processes_than_cores_fail_at_once_and_write_nothing(upstream_of_instances, tiny_model_dir, tmp_path):
    import dagster as dg
    import duckdb

    data_dir = copy_data_dir(upstream_of_instances, tmp_path / "data")
    db = data_dir / "refine_af.duckdb"
    with duckdb.connect(str(db), read_only=True) as conn:
        before = conn.execute("SELECT run_id, count(*) FROM rl_refined_policy GROUP BY run_id").fetchall()
    too_many = len(os.sched_getaffinity(0)) + 1
    started = time.monotonic()
    with pytest.raises(dg.Failure, match=f"asks for {too_many} torchrun processes .* {too_many - 1} CPU cores"):
        materialize(
            data_dir,
            str(tiny_model_dir),
            smallest_run_config(),
            selection=["rl_refined_policy"],
            training_launcher={"launcher": "torchrun", "processes": too_many},
        )
    assert time.monotonic() - started < 30
    with duckdb.connect(str(db), read_only=True) as conn:
        assert conn.execute("SELECT run_id, count(*) FROM rl_refined_policy GROUP BY run_id").fetchall() == before
    assert not list((data_dir / "artifacts" / "rl_refined_policy" / "checkpoints").glob("*/checkpoint-*"))


def test_the_guard_ends_its_command_when_the_launching_step_dies(tmp_path):
    """parent_guard under a parent that is SIGKILLed: the guarded command's process group ends."""
    pid_file, lock = tmp_path / "child.pid", tmp_path / "trainer.lock"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    guard = [sys.executable, "-m", "refine_af_pipeline.training.parent_guard", str(lock), "--"]
    guarded = guard + [sys.executable, "-c", sleeper]
    step_script = f"import subprocess, time; subprocess.Popen({guarded!r}); time.sleep(120)"
    step = subprocess.Popen([sys.executable, "-c", step_script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the guarded command did not start"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    # A second guard on the same lock refuses at once: an earlier trainer still lives.
    second = subprocess.run([*guard, sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=30)
    assert second.returncode == 75 and "another trainer holds" in second.stderr
    os.kill(step.pid, signal.SIGKILL)  # the step dies; the guard is orphaned
    step.wait()
    deadline = time.monotonic() + 30
    while _alive(child):
        assert time.monotonic() < deadline, "the guarded command outlived its step"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by init) counts as ended.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
