"""Stable splits by a hash of an id: the same id falls on the same side in every run and stage,
and a larger share holds out a superset of a smaller one's ids."""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def hash_bucket(key: str, salt: str = "") -> int:
    """0 .. BUCKETS-1 from sha256 of the key; a salt gives a split independent of unsalted ones."""
    text = f"{salt}:{key}" if salt else key
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % BUCKETS


def in_share(key: str, share: float, salt: str = "") -> bool:
    return hash_bucket(key, salt) < share * BUCKETS
