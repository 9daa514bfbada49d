"""Training killed with SIGKILL after a checkpoint resumes from it: GRPO, SFT and the TeaMs-RL
instructor on the tiny model, each in its own process (tests/training_child.py). The re-run takes
exactly the remaining optimizer steps and ends where an uninterrupted run ends: the same step count,
the same per-step losses (within 1e-5: on one CPU the resumed trajectory is the same arithmetic) and
the same adapter weights.

The kill lands after the first epoch, where a sampler seeded once per run would replay the first
epoch's order: the resumed run must still see the uninterrupted run's data order."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refine_af_pipeline.training.checkpoints import Checkpoints

pytestmark = pytest.mark.slow

CHILD = Path(__file__).parent / "training_child.py"
LOSS_TOLERANCE = 1e-5
# The child saves every 2 steps (the instructor every update); kill once the checkpoint named here is
# complete: inside the second epoch for GRPO (3 steps an epoch) and SFT (6), where a sampler seeded
# once per run would draw the first epoch's order again.
KILL_AFTER = {"grpo": 4, "sft": 8, "instructor": 2}


def run_child(kind: str, model_dir: Path, folder: Path, out: Path, pause_from: int | None = None):
    command = [sys.executable, str(CHILD), kind, str(model_dir), str(folder), str(out)]
    return command + ([str(pause_from)] if pause_from is not None else [])


def uninterrupted(kind: str, model_dir: Path, tmp: Path) -> dict:
    out = tmp / "full.json"
    subprocess.run(run_child(kind, model_dir, tmp / "full-checkpoints", out), check=True, capture_output=True)
    return json.loads(out.read_text())


def killed_then_resumed(kind: str, model_dir: Path, tmp: Path) -> tuple[int, dict]:
    folder, every = tmp / "checkpoints", 1 if kind == "instructor" else 2
    checkpoints = Checkpoints(folder, every)
    kill_after = KILL_AFTER[kind]
    child = subprocess.Popen(
        run_child(kind, model_dir, folder, tmp / "killed.json", kill_after),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while checkpoints.latest_step() < kill_after and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the child ended before it could be killed"
    assert not (tmp / "killed.json").exists()
    at_kill = checkpoints.latest_step()
    out = tmp / "resumed.json"
    subprocess.run(run_child(kind, model_dir, folder, out), check=True, capture_output=True)
    return at_kill, json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["grpo", "sft", "instructor"])
def test_a_killed_training_resumes_from_its_last_checkpoint(kind, tiny_model_dir, tmp_path):
    full = uninterrupted(kind, tiny_model_dir, tmp_path)
    at_kill, resumed = killed_then_resumed(kind, tiny_model_dir, tmp_path)
    assert at_kill >= KILL_AFTER[kind]
    assert full["resumed_from_step"] == 0 and full["steps_taken"] == len(full["steps"])
    assert resumed["resumed_from_step"] == at_kill
    # Exactly the remaining steps, and the whole log: the steps before the kill come from the checkpoint.
    assert resumed["steps_taken"] == len(full["steps"]) - at_kill
    assert resumed["steps"] == full["steps"]
    assert resumed["losses"] == pytest.approx(full["losses"], abs=LOSS_TOLERANCE)
    assert resumed["adapter"] == full["adapter"]
    if kind == "grpo":
        # The reward recorder's records of the steps before the kill were saved with the checkpoint.
        assert resumed["learned_reward_mean"] == pytest.approx(full["learned_reward_mean"], abs=LOSS_TOLERANCE)
    if kind == "instructor":
        # The same episodes, drawn in the same order, and every transition of the run once.
        assert resumed["seed_ids"] == full["seed_ids"] and resumed["transitions"] == full["transitions"]
    # A finished training removes its checkpoints: the next run trains afresh.
    assert not (tmp_path / "checkpoints").exists()
