"""Stable splits by a hash of an id: the same id falls on the same side in every run and stage,
and a larger share holds out a superset of a smaller one's ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

BUCKETS = 10_000


def hash_bucket(key: str, salt: str = "") -> int:
    """0 .. BUCKETS-1 from sha256 of the key; a salt gives a split independent of unsalted ones."""
    text = f"{salt}:{key}" if salt else key
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % BUCKETS


def in_share(key: str, share: float, salt: str = "") -> bool:
    return hash_bucket(key, salt) < share * BUCKETS


@dataclass(frozen=True)
class Split:
    held: frozenset[str]
    # The hash share that holds out exactly `held` (the configured one unless a bound moved it):
    # recorded by a stage, it re-derives the same side for every id, and on a grown pool adds only
    # new ids to the held-out side.
    share: float


def stable_split(
    keys: Iterable[str],
    share: float,
    salt: str = "",
    minimum: int = 0,
    max_fraction: float = 1.0,
    min_cap: int = 0,
) -> Split:
    """The one split of the pipeline (RL's held-out instructions, the SFT validation slice, TeaMs-RL's
    held-out seed tasks, the reward model's held-out pairs): the keys in the lowest `share` of the
    salted hash, but at least min(minimum, max_fraction of the keys) and at most max_fraction of
    them (a small pool: the hash share is a share only on average), then the lowest-hash keys.
    `min_cap` raises that cap on a pool so small that max_fraction of it rounds below it, while at
    least one key stays on the other side. Depends only on the set of keys, not their order or repeats."""
    distinct = sorted(set(keys), key=lambda k: (hash_bucket(k, salt), k))
    cap = max(int(len(distinct) * max_fraction), min(min_cap, len(distinct) - 1))
    held = [k for k in distinct if in_share(k, share, salt)]  # a prefix of `distinct`
    target = min(max(len(held), min(minimum, cap)), cap)
    if target == len(held):
        return Split(frozenset(held), share)
    chosen = distinct[:target]
    return Split(frozenset(chosen), (hash_bucket(chosen[-1], salt) + 1) / BUCKETS if chosen else 0.0)


def sample_rows(df: pl.DataFrame, limit: int, seed: int, order_by: str = "instruction_id") -> pl.DataFrame:
    """The pipeline's one sampler: a reproducible sample of at most `limit` rows (0 = all), in
    `order_by` order so the rows that follow do not depend on the draw's order."""
    if limit <= 0 or df.height <= limit:
        return df
    return df.sample(n=limit, seed=seed).sort(order_by)
