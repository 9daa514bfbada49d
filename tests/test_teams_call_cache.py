"""The TeaMs-RL call cache: a context manager that closes its connection however the block ends."""

import sqlite3

import pytest

from refine_af_pipeline.teams.call_cache import FILE_NAME, CallCache

pytestmark = pytest.mark.unit


def _is_closed(cache: CallCache) -> bool:
    try:
        cache.get_many(["any"])
    except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
        return True
    return False


def test_the_cache_closes_when_its_block_raises_and_keeps_what_was_written(tmp_path):
    with pytest.raises(RuntimeError, match="the model failed"):
        with CallCache.in_folder(tmp_path) as cache:
            cache.put_many({"k1": ["a rewrite", 12, False]})
            raise RuntimeError("the model failed")
    assert _is_closed(cache)
    with CallCache.in_folder(tmp_path) as again:  # what the block wrote before it raised is kept
        assert again.get_many(["k1", "k2"]) == {"k1": ["a rewrite", 12, False]}
        assert (again.hits, again.misses) == (1, 1)
    assert _is_closed(again) and again.path == tmp_path / FILE_NAME


def test_the_counts_outlive_the_closed_cache(tmp_path):
    with CallCache(tmp_path / "c.sqlite") as cache:
        cache.get_many(["a", "b", "a"])
    assert _is_closed(cache) and (cache.hits, cache.misses) == (0, 2)
