"""Reward-hacking indicators for the RL training log: degenerate repeats and length blow-up.

A policy can raise an automated reward without writing better instances, e.g. by padding the
output until it hits the token limit or by looping a phrase that the judge happens to like. These
measures make that visible per step; `reward_hacking_warnings` turns a trend into a message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

REPEAT_NGRAM = 3
# Trend thresholds (first third of the steps vs the last third).
LENGTH_GROWTH_FACTOR = 1.5
CLIPPED_SHARE_LIMIT = 0.5
CLIPPED_RISE = 0.2
REPEAT_RISE = 0.05
REPEAT_LEVEL = 0.3


def repeated_ngram_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """Share of the word n-grams in `text` that already occurred earlier in it: 0 for text with no
    repeat, close to 1 for a phrase looped until the token limit. Text shorter than n words: 0."""
    words = text.lower().split()
    grams = [tuple(words[k : k + n]) for k in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def mean_repeat_share(texts: Sequence[str], n: int = REPEAT_NGRAM) -> float:
    return sum(repeated_ngram_share(t, n) for t in texts) / len(texts) if texts else math.nan


def _window_mean(values: Sequence[float], first: bool) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan
    width = max(1, len(finite) // 3)
    part = finite[:width] if first else finite[-width:]
    return sum(part) / len(part)


def reward_hacking_warnings(log: Sequence[Mapping[str, float]], max_completion_length: int) -> list[str]:
    """Messages for trends that suggest the policy games the reward; empty when none is seen."""
    if len(log) < 2:
        return []
    warnings = []
    lengths = [r.get("completion_length", math.nan) for r in log]
    start, end = _window_mean(lengths, True), _window_mean(lengths, False)
    if start > 0 and end > LENGTH_GROWTH_FACTOR * start:
        warnings.append(
            f"completion length grew from {start:.1f} to {end:.1f} tokens "
            f"(limit {max_completion_length}): check the outputs for padding"
        )
    # A high share from the first step on only says the limit is short; a rising one is a trend.
    clipped = [r.get("clipped_share", math.nan) for r in log]
    c_start, c_end = _window_mean(clipped, True), _window_mean(clipped, False)
    if c_end >= CLIPPED_SHARE_LIMIT and c_end - c_start > CLIPPED_RISE:
        warnings.append(
            f"the share of completions cut at the {max_completion_length}-token limit rose from "
            f"{c_start:.0%} to {c_end:.0%}"
        )
    repeats = [r.get("repeat_share", math.nan) for r in log]
    r_start, r_end = _window_mean(repeats, True), _window_mean(repeats, False)
    if r_end - r_start > REPEAT_RISE or r_end >= REPEAT_LEVEL:
        warnings.append(
            f"repeated {REPEAT_NGRAM}-gram share rose from {r_start:.2f} to {r_end:.2f}: "
            "completions are becoming degenerate"
        )
    return warnings
