"""teams_evolved_instructions: the learned policy's chains on seed tasks, every intermediate
instruction a row, and which of them are kept. Kept: no reviewer rule fired, P(differs) at least
min_p_differs, Self-Instruct's filters passed, and no ROUGE-L near duplicate of a seed task or of
an instruction kept before it."""

from __future__ import annotations

import polars as pl

from ..instructions.filters import rejection_reason
from ..instructions.rouge import RougeDeduplicator
from .evolution import ChainLink
from .transition_frames import transition_frame


def evolved_row(link: ChainLink) -> dict:
    """A row of teams_evolved_instructions (the chain runner's `row`): the step, the instruction
    it wrote (`instruction`) and the one it rewrote (`previous_instruction`)."""
    r = link.result
    return dict(
        seed_id=link.seed_id,
        seed_instruction=link.seed_instruction,
        step=link.step,
        state=link.state,
        operation=r.operation,
        reward=r.reward,
        p_differs=r.p_differs,
        rule=r.rule,
        rewrite_cached=r.rewrite_cached,
        review_cached=r.review_cached,
        generation_tokens=r.generation_tokens,
        hit_token_limit=r.hit_token_limit,
        instruction_id=f"teams-{link.seed_id}-{link.step}",
        instruction=r.after,
        previous_instruction=r.before,
    )


def keep_decisions(
    rows: list[dict], seed_instructions: list[str], min_p_differs: float, rouge_threshold: float
) -> list[dict]:
    """`rows` (evolved_row) with max_rouge_l, filter_reason and keep, decided in order: the
    de-duplicator's pool starts with the seed tasks and grows by each instruction kept."""
    dedup = RougeDeduplicator(seed_instructions, threshold=rouge_threshold)
    decided = []
    for r in rows:
        reason = r["rule"] or (None if (r["p_differs"] or 0) >= min_p_differs else "no_information_gain")
        reason = reason or rejection_reason(r["instruction"])
        max_rouge_l = None
        if reason is None:  # the de-duplicator adds what it keeps to its pool
            decision = dedup.consider(r["instruction"])
            max_rouge_l = decision.max_rouge_l
            reason = None if decision.keep else "near_duplicate"
        decided.append({**r, "max_rouge_l": max_rouge_l, "filter_reason": reason, "keep": reason is None})
    return decided


def evolved_frame(rows: list[dict], **run_columns) -> pl.DataFrame:
    """The table: the decided rows and the run's columns."""
    return transition_frame(rows, **run_columns).with_columns(
        pl.col("filter_reason").cast(pl.Utf8), pl.col("max_rouge_l").cast(pl.Float64)
    )
