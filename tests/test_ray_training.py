"""Training with training_launcher `ray` on a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster, one CPU per node, so two one-CPU workers land on different nodes): SFT
on two Ray Train workers against one plain process with the same global batch (the spec of
test_distributed_training.py), and a cluster that cannot be reached or cannot hold the workers
failing at once, before anything is written.

Tolerance as in test_distributed_training.py: the two workers compute the same per-step arithmetic,
summed in another order across ranks, so per-step losses agree within 1e-4."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from test_distributed_training import _spec

from resources.training_launcher import TrainingLauncherResource, training_launcher_from_env

TOLERANCE = 1e-4


def on_cluster(test):
    """Starts a Ray cluster and the tiny model: tier slow, and `-m cluster` picks it."""
    return pytest.mark.cluster(pytest.mark.slow(test))


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def _one_process(model_dir: Path, folder: Path) -> dict:
    """The torchrun worker on the spec as one plain process (no torchrun, no Ray)."""
    folder.mkdir(parents=True)
    spec_file = folder / "spec.json"
    spec_file.write_text(json.dumps(_spec("sft", model_dir, folder)))
    command = [sys.executable, "-m", "refine_af_pipeline.training.torchrun_worker", str(spec_file)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((folder / "result.json").read_text())


@on_cluster
def test_two_ray_workers_on_two_nodes_train_what_one_process_trains(cluster, tiny_model_dir, tmp_path):
    alone = _one_process(tiny_model_dir, tmp_path / "one")
    work = tmp_path / "ray" / "work"
    launcher = TrainingLauncherResource(launcher="ray", processes=2, ray_address=cluster.address)
    lines: list[str] = []
    two = launcher.train_on_ray(_spec("sft", tiny_model_dir, tmp_path / "ray"), work, lines.append)
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob("rank-*.json"))]
    assert two["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    # One worker on each node: the run crossed nodes.
    assert ranks[0]["node_id"] != ranks[1]["node_id"]
    # The global batch is the config's: 12 pairs in batches of 4 for 2 epochs.
    assert two["steps_taken"] == alone["steps_taken"] == 6
    assert [r["steps_taken"] for r in ranks] == [6, 6]
    # DDP synchronised the two ranks: the same adapter at the end.
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"]
    assert (Path(two["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert [s["step"] for s in two["log"]] == [s["step"] for s in alone["log"]]
    assert [s["loss"] for s in two["log"]] == pytest.approx([s["loss"] for s in alone["log"]], abs=TOLERANCE)
    # Rank 0's log lines reached the caller's log.
    assert any("SFT step 6/6" in line and "(2 processes)" in line for line in lines), lines


@on_cluster
@pytest.mark.parametrize(
    ("ask", "message"),
    [
        ({"gpus_per_worker": 1}, r"2 worker\(s\) of 1 CPU and 1 GPU each .* 2 CPUs and 0 GPUs in all, room for 0"),
        ({"processes": 3}, r"3 worker\(s\) of 1 CPU each \(3 CPUs in all\) .* 2 CPUs and 0 GPUs in all, room for 2"),
        ({"cpus_per_worker": 2}, r"2 worker\(s\) of 2 CPU each .* 2 node\(s\) with 2 CPUs .* room for 0"),
    ],
)
def test_a_cluster_too_small_for_the_workers_fails_at_once_naming_both(cluster, tiny_model_dir, tmp_path, ask, message):
    launcher = TrainingLauncherResource(launcher="ray", ray_address=cluster.address, **({"processes": 2} | ask))
    work = tmp_path / "work"
    started = time.monotonic()
    with pytest.raises(dg.Failure, match=message):
        launcher.train_on_ray(_spec("sft", tiny_model_dir, tmp_path), work, print)
    assert time.monotonic() - started < 30
    assert not work.exists()


@on_cluster
def test_an_unreachable_ray_address_fails_at_once_naming_it(tiny_model_dir, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    launcher = TrainingLauncherResource(launcher="ray", processes=2, ray_address=address)
    work = tmp_path / "work"
    started = time.monotonic()
    with pytest.raises(dg.Failure, match=f"cannot reach the Ray cluster at ray_address '{address}'"):
        launcher.train_on_ray(_spec("sft", tiny_model_dir, tmp_path), work, print)
    assert time.monotonic() - started < 30
    assert not work.exists()


@pytest.mark.unit
def test_the_ray_fields_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("REFINE_AF_TRAINING_LAUNCHER", "ray")
    monkeypatch.setenv("REFINE_AF_TRAINING_PROCESSES", "4")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    monkeypatch.setenv("REFINE_AF_TRAINING_CPUS_PER_WORKER", "3")
    monkeypatch.setenv("REFINE_AF_TRAINING_GPUS_PER_WORKER", "1")
    launcher = training_launcher_from_env()
    assert (launcher.launcher, launcher.processes, launcher.distributed) == ("ray", 4, True)
    assert (launcher.ray_address, launcher.cpus_per_worker, launcher.gpus_per_worker) == ("10.0.0.9:6379", 3, 1.0)
    monkeypatch.setenv("REFINE_AF_TRAINING_RAY_ADDRESS", "10.0.0.1:6379")  # wins over RAY_ADDRESS
    assert training_launcher_from_env().ray_address == "10.0.0.1:6379"
    monkeypatch.setenv("REFINE_AF_TRAINING_GPUS_PER_WORKER", "half")
    with pytest.raises(ValueError, match="REFINE_AF_TRAINING_GPUS_PER_WORKER must be a number"):
        training_launcher_from_env()
    with pytest.raises(dg.Failure, match="gpus_per_worker must be 0 or at least 1"):
        TrainingLauncherResource(launcher="ray", gpus_per_worker=0.5).check_devices("cpu")
