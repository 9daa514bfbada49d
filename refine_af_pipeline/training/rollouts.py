"""Rollouts whose every row draws from its own random stream.

TRL samples a step's completions with the global RNG, one draw per token for the whole batch, so a
row's completion depends on its batch mates: split the step's rows over two processes and every
completion changes. Here each row's stream is seeded by (trainer seed, optimizer step, the row's
place in the step's global batch), so a step's completions are the same in one process or
several, and a run resumed from a checkpoint draws the ones the uninterrupted run drew.

The draw is a logits processor placed after the sort-free nucleus processor (rl.sort_free_rollouts,
which applies temperature and top-p): it picks one token per row from the row's distribution with
the row's uniform (llm/sampling.pick_by_uniform) and leaves only that token's logit finite, so
transformers' own multinomial draw can only take it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..llm.backend import row_seed
from ..llm.sampling import pick_by_uniform
from .distributed import rank

STEP_STRIDE = 1_000_003


def row_seeded_processor(seeds: list[int]):
    """A LogitsProcessor drawing row r's next token with a generator seeded `seeds[r]`."""
    import torch
    from transformers import LogitsProcessor

    generators = [torch.Generator().manual_seed(s) for s in seeds]

    class RowSeededDraw(LogitsProcessor):
        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float(), dim=-1)
            uniforms = torch.cat([torch.rand(1, generator=g) for g in generators])
            ids = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
            chosen = pick_by_uniform(probs, ids, uniforms)
            only = torch.full_like(scores, float("-inf"))
            return only.scatter(-1, chosen.unsqueeze(-1), 0.0)

    return RowSeededDraw()


@contextmanager
def row_seeded_rollouts(trainer, seed: int) -> Iterator[bool]:
    """Inside, the trainer's policy samples rollouts row by row (see the module docstring). Every
    process generates the same number of rows per step (TRL splits the step's batch evenly), so
    this process's row i is row rank x rows + i of the step. Yields False, changing nothing, where
    the trainer does not sample with model.generate (vLLM rollouts)."""
    if getattr(trainer, "generation_config", None) is None:
        yield False
        return

    def draw(*args, **kwargs):
        rows = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0]
        step_seed = seed * STEP_STRIDE + trainer.state.global_step
        return row_seeded_processor([row_seed(step_seed, rank() * rows + i) for i in range(rows)])

    with processor_added(trainer.model, draw):
        yield True


@contextmanager
def processor_added(model, make_processor) -> Iterator[None]:
    """Inside, every model.generate call runs the caller's logits processors, then
    make_processor(*the call's arguments); transformers runs a caller's processors before its own
    warpers. The model's generate is restored on exit, nested installs in reverse order."""
    from transformers import LogitsProcessorList

    original, own = model.generate, model.__dict__.get("generate")

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(make_processor(*args, **kwargs))
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        if own is None:
            del model.generate
        else:
            model.generate = own
