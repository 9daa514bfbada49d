"""Training as Ray Train workers spread over a Ray cluster's nodes (training_launcher `ray`).

Each worker is one DDP rank running the torchrun worker's own run_sft / run_rl on the spec that
resources/training_launcher.py builds. Ray Train starts the workers (one placement-group bundle
of `cpus_per_worker` CPUs and `gpus_per_worker` GPUs each) and initialises torch.distributed before
the train loop runs (gloo on CPU, NCCL on CUDA); the loop copies Ray's ranks into the torchrun
variables that distributed.py reads, so the global batch, the DistributedSampler and "only rank 0
writes" hold as under torchrun, and HF Trainer / accelerate join the process group that exists.

What comes back to the step goes through Ray, not through files: rank 0 returns its summary, its
log lines and every rank's adapter digest (gathered over the process group), and the step writes
result.json and rank-<r>.json into its work folder. The adapter and the checkpoints are written
by rank 0 wherever it runs, so on a real cluster the artifact store must be a folder every node
sees at the same path (docs/distributed.md, "Training across nodes with Ray Train").
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A reachable cluster answers a TCP connect at once; ray.init itself retries for minutes.
CONNECT_TIMEOUT_S = 10.0


class RayTrainError(RuntimeError):
    """The cluster cannot be reached or cannot hold the workers; raised before anything is written."""


@dataclass(frozen=True)
class RayTrainSettings:
    workers: int
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the step
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0

    @property
    def device(self) -> str:
        # Ray hides the GPUs it did not give a worker, so the workers' device follows the ask.
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    def where(self) -> str:
        return self.address or os.environ.get("RAY_ADDRESS") or "a local Ray"

    def ask(self) -> str:
        gpus = f" and {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        total_gpus = f", {self.workers * self.gpus_per_worker:g} GPUs" if self.gpus_per_worker else ""
        return (
            f"{self.workers} worker(s) of {self.cpus_per_worker} CPU{gpus} each "
            f"({self.workers * self.cpus_per_worker} CPUs{total_gpus} in all)"
        )


def train(spec: dict, settings: RayTrainSettings, workdir: Path, log: Callable[[str], None]) -> dict:
    """Trains `spec` on `settings.workers` Ray Train workers and returns rank 0's summary (the
    torchrun worker's result); rank 0's log lines go to `log` once training ends."""
    try:
        import ray
    except ImportError:
        raise RayTrainError("training_launcher ray needs Ray on this machine and every node: pip install ray") from None

    connected = connect(ray, settings.address)
    try:
        check_capacity(ray, settings)
        workdir.mkdir(parents=True, exist_ok=True)
        with trainer_lock(Path(spec["checkpoints"]["folder"] if spec.get("checkpoints") else workdir)):
            returned = _fit(spec | {"device": settings.device}, settings, workdir)
    finally:
        if connected:
            ray.shutdown()
    for line in returned["lines"]:
        log(line)
    return _record(returned, workdir)


def _fit(spec: dict, settings: RayTrainSettings, workdir: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        resources["GPU"] = settings.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "cpus": settings.cpus_per_worker},
        scaling_config=ScalingConfig(
            num_workers=settings.workers, use_gpu=settings.device == "cuda", resources_per_worker=resources
        ),
        # Ray Train keeps its run state under storage_path. Here it is the step's work folder in the
        # artifact store, a local path (enough on one machine); on a real cluster it must be a path
        # every node sees at the same place, or an object-store URI.
        run_config=RunConfig(storage_path=str(workdir.resolve()), name=f"ray-train-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError wraps the worker's traceback
        raise RuntimeError(
            f"Ray Train with {settings.workers} workers on {settings.where()} failed: {exc} (each worker's output "
            "is in the step's stderr, the compute log)"
        ) from exc
    return result.return_value


def _record(returned: dict, workdir: Path) -> dict:
    """Writes rank-<r>.json (with the rank's node) and result.json, as the torchrun worker does, and
    checks that this machine sees the adapter rank 0 wrote."""
    for mine in returned["ranks"]:
        (workdir / f"rank-{mine['rank']}.json").write_text(json.dumps(mine))
    summary = returned["summary"]
    (workdir / "result.json").write_text(json.dumps(summary))
    if not Path(summary["adapter_dir"]).is_dir():
        raise RuntimeError(
            f"rank 0 (node {returned['ranks'][0]['node_id']}) wrote the adapter to {summary['adapter_dir']} but this "
            "machine does not see it: the artifact store must be a folder every Ray node sees at the same path"
        )
    return summary


# ---------------------------------------------------------------------------------------------
# On each worker


def train_loop(config: dict) -> dict:
    """One Ray Train worker: a DDP rank of the torchrun worker's SFT or RL. Returns (rank 0's value
    is the one Ray keeps) the summary, rank 0's log lines and every rank's adapter digest."""
    import ray
    import ray.train

    from .distributed import gathered, is_main_process, rank
    from .torchrun_worker import _device, adapter_digest, run_rl, run_sft

    _set_rank_env(ray.train.get_context())
    spec = config["spec"]
    if spec["device"] == "cpu":
        import torch

        torch.set_num_threads(config["cpus"])  # Ray reserved these cores; torch would take the node's
    lines: list[str] = []

    def say(text: str) -> None:
        if is_main_process():
            # Live in the step's stderr through Ray's worker-output forwarding (not print: Ray Train
            # patches it to log as well, which forwards each line twice).
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
            lines.append(text)

    summary, model = {"sft": run_sft, "rl": run_rl}[spec["kind"]](spec, _device(spec), say)
    mine = {
        "rank": rank(),
        "adapter_digest": adapter_digest(model),
        "steps_taken": summary["steps_taken"],
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    return {"summary": summary, "lines": lines, "ranks": gathered([mine])}


def _set_rank_env(context) -> None:
    """The torchrun variables from Ray Train's context, before anything reads them: distributed.py
    and accelerate read these; Ray Train has already joined the process group."""
    os.environ.update(
        RANK=str(context.get_world_rank()),
        WORLD_SIZE=str(context.get_world_size()),
        LOCAL_RANK=str(context.get_local_rank()),
        LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
        NODE_RANK=str(context.get_node_rank()),
    )


# ---------------------------------------------------------------------------------------------
# The cluster: reach it, check that it can hold the workers


def connect(ray, address: str | None) -> bool:
    """Joins the cluster at `address` (None: RAY_ADDRESS, else a new local Ray); True when this call
    connected (so the caller disconnects), False when the process already was."""
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        check_reachable(target)  # also when already connected: an address asked for must answer
    if ray.is_initialized():
        return False
    # A Ray started here needs no dashboard (plain ray has none); one joined keeps its own.
    here = {"include_dashboard": False} if not target or target == "local" else {}
    try:
        ray.init(address=target, logging_level="WARNING", runtime_env={"env_vars": _job_env(target)}, **here)
    except (ConnectionError, RuntimeError) as exc:
        raise RayTrainError(f"cannot connect to the Ray cluster at {target or 'a new local Ray'}: {exc}") from None
    return True


def _job_env(target: str | None) -> dict[str, str]:
    # The workers import this package: on a cluster of one machine from here, elsewhere installed.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if target and ":" in target and not target.startswith("ray://"):
        # Ray Train's placement-group cleaner asks the state API for the controller; with several Ray
        # instances on one machine it would ask the latest one, find no controller, and end our workers.
        env["RAY_ADDRESS"] = target
    return env


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """RayTrainError naming `address` unless it answers: the ray backend's check."""
    from ..llm.ray_backend import RayClusterError
    from ..llm.ray_backend import check_reachable as answers

    try:
        answers(address, timeout_s)
    except RayClusterError as exc:
        raise RayTrainError(str(exc).replace("the Ray cluster at", "the Ray cluster at ray_address", 1)) from None


def check_capacity(ray, settings: RayTrainSettings) -> None:
    """RayTrainError when the cluster's nodes, empty, could not hold the workers: Ray Train would
    otherwise wait for its placement group for ever."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fit = sum(_workers_that_fit(n["Resources"], settings) for n in nodes)
    if fit >= settings.workers:
        return
    totals = ray.cluster_resources()
    raise RayTrainError(
        f"training_launcher asked for {settings.ask()} on {settings.where()}; the cluster has {len(nodes)} node(s) "
        f"with {totals.get('CPU', 0):g} CPUs and {totals.get('GPU', 0):g} GPUs in all, room for {fit} such "
        "worker(s). Lower processes, cpus_per_worker or gpus_per_worker, or add nodes"
    )


def _workers_that_fit(node: Mapping[str, float], settings: RayTrainSettings) -> int:
    from ..llm.ray_backend import actors_that_fit

    return actors_that_fit(node, settings.cpus_per_worker, settings.gpus_per_worker)


@contextmanager
def trainer_lock(folder: Path) -> Iterator[None]:
    """The checkpoint folder's trainer lock (the one parent_guard takes for torchrun): a second
    trainer on the same checkpoints fails at once."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / ".trainer.lock"
    with lock_file.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RayTrainError(
                f"another trainer holds {lock_file}: an earlier run's training is still alive"
            ) from None
        yield
