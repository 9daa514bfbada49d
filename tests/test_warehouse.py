import subprocess
import sys
import time

import duckdb
import polars as pl
import pytest

from resources import DatabaseLocked, Warehouse

pytestmark = pytest.mark.unit


def test_write_replace_append_and_read(tmp_path):
    wh = Warehouse(database=str(tmp_path / "w.duckdb"))
    assert wh.read_table("t") is None and wh.row_count("t") == 0
    wh.write_table("t", pl.DataFrame({"a": [1, 2]}))
    wh.write_table("t", pl.DataFrame({"a": [3]}), mode="append")
    assert wh.read_table("t", order_by="a")["a"].to_list() == [1, 2, 3]
    assert wh.row_count("t") == 3
    wh.write_table("t", pl.DataFrame({"a": [9]}))
    assert wh.read_table("t")["a"].to_list() == [9]


def test_failed_append_leaves_table_unchanged(tmp_path):
    wh = Warehouse(database=str(tmp_path / "w.duckdb"))
    wh.write_table("t", pl.DataFrame({"a": [1]}))
    with pytest.raises(duckdb.Error):
        wh.write_table("t", pl.DataFrame({"b": ["not a column"]}), mode="append")
    assert wh.read_table("t")["a"].to_list() == [1]


def test_locked_database_gives_a_clear_error_quickly(tmp_path):
    db = tmp_path / "locked.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        wh = Warehouse(database=str(db), lock_timeout_s=2)
        started = time.monotonic()
        with pytest.raises(DatabaseLocked, match="locked.duckdb is locked by another process"):
            wh.read_table("anything")
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()


def test_an_append_with_a_new_column_adds_it_and_the_old_rows_read_null(tmp_path):
    wh = Warehouse(database=str(tmp_path / "w.duckdb"))
    wh.write_table("t", pl.DataFrame({"a": [1], "model_id": ["m"]}))
    wh.write_table("t", pl.DataFrame({"a": [2], "model_id": ["m"], "backend": ["openai"]}), mode="append")
    assert wh.read_table("t", order_by="a").to_dicts() == [
        {"a": 1, "model_id": "m", "backend": None},
        {"a": 2, "model_id": "m", "backend": "openai"},
    ]
    with pytest.raises(duckdb.Error):  # rows without the table's columns are not a newer version of it
        wh.write_table("t", pl.DataFrame({"other": [1]}), mode="append")
    assert wh.read_table("t").columns == ["a", "model_id", "backend"]
