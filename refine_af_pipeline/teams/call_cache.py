"""A persistent cache of model calls (rewrites and judgements), keyed by everything that decides
the answer: model as served, prompt, sampling and seed. An episode step is an LLM call, and RL
revisits the same (instruction, operation) often; SQLite, so a crashed run keeps what it wrote
and two steps never corrupt it. Use it as a context manager: `with CallCache.in_folder(root) as
cache:` closes the connection however the block ends."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

# The one cache file every TeaMs-RL stage shares, in the artifact store's root folder.
FILE_NAME = "teams_call_cache.sqlite"


class CallCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60)
        try:
            self._conn.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._conn.commit()
        except BaseException:
            self._conn.close()
            raise
        self.hits = 0
        self.misses = 0

    @classmethod
    def in_folder(cls, folder: str | Path) -> CallCache:
        """The cache the TeaMs-RL stages share, in `folder` (the artifact store's root)."""
        return cls(Path(folder) / FILE_NAME)

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @staticmethod
    def key(kind: str, *parts) -> str:
        return kind + ":" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get_many(self, keys: Iterable[str]) -> dict:
        keys = list(dict.fromkeys(keys))
        found: dict = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = self._conn.execute(
                f"SELECT key, value FROM calls WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            found.update({k: json.loads(v) for k, v in rows})
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, values: Mapping[str, object]) -> None:
        with self._conn:  # one transaction: a crash leaves all of these or none
            self._conn.executemany(
                "INSERT OR REPLACE INTO calls (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    def close(self) -> None:
        self._conn.close()
