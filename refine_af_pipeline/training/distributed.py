"""What a trainer needs to know when torchrun (or Ray Train) starts it as one of several processes:
the world size, whether this is the process that writes, and the per-process share of a step.

The global batch is the config's: each optimizer step sees `total` examples (SFT's batch_size, RL's
prompts_per_step x group_size) however many processes share it, so each process accumulates
total / (per-pass batch x world size) passes."""

from __future__ import annotations

import os


def world_size() -> int:
    """Processes training together (torchrun's WORLD_SIZE; 1 in process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def accumulation_steps(total: int, per_pass: int, what: str) -> int:
    """Passes each process accumulates per optimizer step so that the step covers `total`
    examples over all processes; a ValueError naming the sizes when they do not divide."""
    world = world_size()
    if total % (per_pass * world):
        raise ValueError(
            f"{what} ({total}) must be a multiple of train_batch_size ({per_pass}) x processes ({world}), so that "
            "every process takes the same share of each optimizer step"
        )
    return total // (per_pass * world)


def gathered(items: list) -> list:
    """`items` of every process, concatenated in rank order (just `items` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
