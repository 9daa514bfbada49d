"""Training that survives a kill: checkpoints every N optimizer steps, in a folder named by what the
training is made of, so that a re-run of a killed step (a new Dagster run) finds them and goes on.

The folder's name is a digest of the settings, the training data and whatever else decides the
result (the reward's standardisation, the base model): a re-run with other data or settings starts
afresh instead of resuming someone else's training. The Trainer's own checkpoints hold the adapter,
optimizer, scheduler, RNG states and log history; beside them each step writes the state our own
code keeps (the reward recorder's per-step records), read back on resume. The folder is removed once
the training has finished and its result is saved.

Data order on resume: the Trainer replays the resumed epoch's sampler and skips the batches already
trained on, which gives the same order only if the sampler draws the same permutation for that
epoch. transformers' LengthGroupedSampler draws from the global RNG and TRL's RepeatSampler from a
generator seeded once (so a resumed run replays epoch 0's order); the samplers here draw epoch e's
order from a generator seeded with (seed, e), which the Trainer's set_epoch reaches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FOLDER = "step_state"


def training_fingerprint(**parts) -> str:
    """16 hex digits of sha256 over the parts (JSON, keys sorted): equal inputs, equal folder."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoints:
    """One training's checkpoint folder and how often it saves (every_steps 0: never)."""

    folder: Path
    every_steps: int

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0

    def latest(self) -> Path | None:
        """The newest complete checkpoint: its trainer state (written last) parses, and the step
        state our code keeps beside it is there. A checkpoint cut short by a kill is passed over."""
        found = []
        for path in self.folder.glob(f"{CHECKPOINT_PREFIX}*"):
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and _complete(path) and self.state_path(int(match.group(1))).is_file():
                found.append((int(match.group(1)), path))
        return max(found)[1] if found else None

    def latest_step(self) -> int:
        latest = self.latest()
        return step_of(latest) if latest is not None else 0

    def state_path(self, step: int) -> Path:
        return self.folder / STATE_FOLDER / f"step-{step}.json"

    def write_state(self, step: int, state: dict) -> None:
        """Our state after optimizer step `step`, written whole or not at all (rename)."""
        path = self.state_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
        # Keep the last few: the Trainer keeps one checkpoint, which may lag the newest step state.
        for old in path.parent.glob("step-*.json"):
            old_step = int(old.stem.split("-")[1])
            if old_step < step - 4 * self.every_steps:
                old.unlink(missing_ok=True)

    def read_state(self, step: int) -> dict:
        return json.loads(self.state_path(step).read_text())

    def discard(self) -> None:
        """Removes the folder once the result is saved: a later run trains afresh."""
        shutil.rmtree(self.folder, ignore_errors=True)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def _complete(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def trainer_save_args(checkpoints: Checkpoints | None) -> dict:
    """TrainingArguments for saving: every N steps into the checkpoint folder, keeping the last
    (with optimizer, scheduler and RNG states, so a resumed run continues the same trajectory)."""
    if checkpoints is None or not checkpoints.enabled:
        return {"save_strategy": "no"}
    return {
        "output_dir": str(checkpoints.folder),
        "save_strategy": "steps",
        "save_steps": checkpoints.every_steps,
        "save_total_limit": 1,
        "save_only_model": False,
    }


def step_state_saver(checkpoints: Checkpoints, state: Callable[[], dict]):
    """A TrainerCallback writing `state()` at the end of every optimizer step; a checkpoint of
    step N is resumable only once step N's state is on disk (Checkpoints.latest)."""
    from transformers import TrainerCallback

    class _SaveStepState(TrainerCallback):
        def on_step_end(self, args, trainer_state, control, **kw):
            if trainer_state.is_world_process_zero:
                checkpoints.write_state(trainer_state.global_step, state())

    return _SaveStepState()


def step_counter():
    """A TrainerCallback counting the optimizer steps this process took (a resumed run takes only
    the remaining ones)."""
    from transformers import TrainerCallback

    class _CountSteps(TrainerCallback):
        taken = 0

        def on_step_end(self, args, trainer_state, control, **kw):
            self.taken += 1

    return _CountSteps()


def epoch_seeded_length_sampler(sampler, seed: int):
    """transformers' LengthGroupedSampler drawing epoch e's order from a generator seeded with
    (seed, e) instead of the global RNG, its groups the size of the global batch."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class _EpochSeeded(LengthGroupedSampler):
        def set_epoch(self, epoch: int) -> None:
            self.generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))

    from .distributed import world_size

    # Grouped by the global batch, not one process's share: every world size sees the same order.
    reseeded = _EpochSeeded(sampler.batch_size * world_size(), lengths=sampler.lengths)
    reseeded.set_epoch(0)
    return reseeded


def epoch_seeded_repeat_sampler(sampler, seed: int):
    """TRL's RepeatSampler drawing epoch e's order from a generator seeded with (seed, e); TRL's
    own seeds its generator once, so a resumed run would replay epoch 0's order."""
    import torch
    from trl.trainer.utils import RepeatSampler

    class _EpochSeeded(RepeatSampler):
        def set_epoch(self, epoch: int) -> None:
            if self.shuffle:
                self.generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))

    reseeded = _EpochSeeded(
        sampler.data_source,
        sampler.mini_repeat_count,
        sampler.batch_size,
        sampler.repeat_count,
        sampler.shuffle,
        seed,
    )
    reseeded.set_epoch(0)
    return reseeded


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


def with_epoch_seeded_sampler(trainer_class, seed: int):
    """`trainer_class` whose training sampler draws each epoch's order from (seed, epoch)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl.trainer.utils import RepeatSampler

    class _Reseeded(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            sampler = super()._get_train_sampler(*args, **kwargs)
            if isinstance(sampler, RepeatSampler):
                return epoch_seeded_repeat_sampler(sampler, seed)
            if isinstance(sampler, LengthGroupedSampler):
                return epoch_seeded_length_sampler(sampler, seed)
            return sampler

    _Reseeded.__name__ = trainer_class.__name__
    return _Reseeded
