"""Where the trainers (RL and SFT) run: in the step's own process, as several processes that
torchrun starts on this machine (launched through Dagster Pipes so their log lines reach the run's
log), or as Ray Train workers spread over a Ray cluster's nodes. Either way the step on the head
reads the result and writes the tables."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field

if TYPE_CHECKING:
    from refine_af_pipeline.training.ray_train_launch import RayTrainSettings

ROOT = Path(__file__).resolve().parent.parent


class TrainingLauncherResource(dg.ConfigurableResource):
    """`in_process` (default): the trainer runs in the step. `torchrun`: `processes` processes on
    this machine train one adapter together (DDP: gloo on CPU, NCCL on CUDA, one GPU each); the
    config's global batch holds (each process accumulates its share), the main process writes the
    adapter, checkpoints and log. `ray`: the same, as `processes` Ray Train workers on the cluster at
    `ray_address`, each with `cpus_per_worker` CPUs and `gpus_per_worker` GPUs. Environment:
    REFINE_AF_TRAINING_LAUNCHER, REFINE_AF_TRAINING_PROCESSES, REFINE_AF_TRAINING_RAY_ADDRESS (else
    RAY_ADDRESS), REFINE_AF_TRAINING_CPUS_PER_WORKER, REFINE_AF_TRAINING_GPUS_PER_WORKER."""

    launcher: Literal["in_process", "torchrun", "ray"] = Field(
        "in_process",
        description="in_process: in the step; torchrun: `processes` processes on this machine; ray: `processes` Ray "
        "Train workers on a Ray cluster",
    )
    processes: int = Field(
        2,
        gt=0,
        description="torchrun: training processes (at most one per GPU, or per CPU core); ray: Ray Train workers",
    )
    ray_address: str | None = Field(
        None, description="ray: the cluster (host:port or ray://host:port); None: RAY_ADDRESS, else a local Ray"
    )
    cpus_per_worker: int = Field(1, gt=0, description="ray: CPUs Ray reserves for each worker")
    gpus_per_worker: float = Field(0, ge=0, description="ray: GPUs for each worker (0: train on CPU; else at least 1)")

    @property
    def distributed(self) -> bool:
        return self.launcher in ("torchrun", "ray")

    def check_devices(self, device: str) -> None:
        """A clear failure, before anything starts, when the processes outnumber the devices (ray:
        the cluster's resources are checked when training starts, before anything is written)."""
        if self.launcher == "ray":
            if 0 < self.gpus_per_worker < 1:
                # DDP over NCCL cannot put two ranks on one GPU.
                raise dg.Failure(
                    f"gpus_per_worker must be 0 or at least 1 (one GPU per rank), got {self.gpus_per_worker:g}"
                )
            return
        if not self.distributed:
            return
        if device.startswith("cuda"):
            import torch

            available, what = torch.cuda.device_count(), "GPUs"
        else:
            available, what = len(os.sched_getaffinity(0)), "CPU cores"
        if self.processes > available:
            raise dg.Failure(
                f"training_launcher asks for {self.processes} torchrun processes but this machine has {available} "
                f"{what} for them; lower processes (REFINE_AF_TRAINING_PROCESSES) to at most {available}"
            )

    def train(self, context: dg.AssetExecutionContext, spec: dict, workdir: Path, device: str) -> dict:
        """Runs torchrun_worker's training on `spec` as `processes` torchrun processes or Ray Train
        workers and returns its result."""
        if self.launcher == "ray":
            ray = self.ray_settings()
            # The workers' device follows gpus_per_worker, not the head's `device`.
            context.log.info(f"training with Ray Train: {ray.ask()} on {ray.where()}, on {ray.device}")
            return self.train_on_ray(spec, workdir, context.log.info)
        self.check_devices(device)
        workdir.mkdir(parents=True, exist_ok=True)
        result = workdir / "result.json"
        result.unlink(missing_ok=True)
        spec_file = workdir / "spec.json"
        spec_file.write_text(json.dumps({**spec, "result": str(result), "device": device}))
        lock = Path(spec["checkpoints"]["folder"] if spec.get("checkpoints") else workdir) / ".trainer.lock"
        command = [
            *(sys.executable, "-m", "refine_af_pipeline.training.parent_guard", str(lock), "--"),
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.processes}"),
            *("-m", "refine_af_pipeline.training.torchrun_worker", str(spec_file)),
        ]
        context.log.info(f"training with torchrun: {self.processes} processes on {device} ({' '.join(command[-6:])})")
        try:
            dg.PipesSubprocessClient(env=self._env(device)).run(context=context, command=command)
        except dg.DagsterPipesExecutionError as exc:
            raise dg.Failure(
                f"torchrun with {self.processes} processes failed ({exc}); each process's traceback is in the step's "
                "stderr (the compute log)"
            ) from None
        if not result.is_file():
            raise dg.Failure(f"torchrun ended without a result in {result}")
        return json.loads(result.read_text())

    def ray_settings(self) -> RayTrainSettings:
        from refine_af_pipeline.training.ray_train_launch import RayTrainSettings

        return RayTrainSettings(self.processes, self.ray_address, self.cpus_per_worker, self.gpus_per_worker)

    def train_on_ray(self, spec: dict, workdir: Path, log) -> dict:
        """The ray launcher without a Dagster context: rank 0's log lines go to `log` when training
        ends (Pipes does not reach Ray workers). A cluster that cannot be reached or cannot hold the
        workers fails before anything is written."""
        from refine_af_pipeline.training import ray_train_launch

        self.check_devices("cuda" if self.gpus_per_worker else "cpu")
        try:
            return ray_train_launch.train(spec, self.ray_settings(), workdir, log)
        except RuntimeError as exc:  # a bad cluster (RayTrainError), a failed worker, an adapter not seen here
            raise dg.Failure(str(exc)) from None

    def _env(self, device: str) -> dict[str, str]:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        if not device.startswith("cuda"):
            # The cores shared out: each process's torch threads on its own cores, not all on every core.
            env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // self.processes))
        return env


def training_launcher_from_env() -> TrainingLauncherResource:
    launcher = os.environ.get("REFINE_AF_TRAINING_LAUNCHER", "").strip() or "in_process"
    processes = os.environ.get("REFINE_AF_TRAINING_PROCESSES", "").strip() or "2"
    cpus = os.environ.get("REFINE_AF_TRAINING_CPUS_PER_WORKER", "").strip() or "1"
    gpus = os.environ.get("REFINE_AF_TRAINING_GPUS_PER_WORKER", "").strip() or "0"
    address = os.environ.get("REFINE_AF_TRAINING_RAY_ADDRESS", "").strip() or os.environ.get("RAY_ADDRESS", "").strip()
    if launcher not in ("in_process", "torchrun", "ray"):
        raise ValueError(f"REFINE_AF_TRAINING_LAUNCHER must be in_process, torchrun or ray, got {launcher!r}")
    if not processes.isdigit() or int(processes) < 1:
        raise ValueError(f"REFINE_AF_TRAINING_PROCESSES must be a positive integer, got {processes!r}")
    if not cpus.isdigit() or int(cpus) < 1:
        raise ValueError(f"REFINE_AF_TRAINING_CPUS_PER_WORKER must be a positive integer, got {cpus!r}")
    if not _non_negative_number(gpus):
        raise ValueError(f"REFINE_AF_TRAINING_GPUS_PER_WORKER must be a number >= 0, got {gpus!r}")
    return TrainingLauncherResource(
        launcher=launcher,
        processes=int(processes),
        ray_address=address or None,
        cpus_per_worker=int(cpus),
        gpus_per_worker=float(gpus),
    )


def _non_negative_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def training_spec(kind: str, language_model, settings: dict, output_dir: Path, checkpoints) -> dict:
    """What every training spec says (torchrun_worker reads it): the kind, the base model as each
    process loads it, the settings, and the output and checkpoint folders."""
    source = language_model.source()
    return {
        "kind": kind,
        "model": {"path": source.path, "model_id": source.model_id, "local_only": source.local_only},
        "dtype": language_model.dtype,
        "trust_remote_code": language_model.trust_remote_code,
        "settings": settings,
        "output_dir": str(output_dir),
        "checkpoints": {"folder": str(checkpoints.folder), "every_steps": checkpoints.every_steps},
    }
