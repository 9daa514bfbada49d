"""The DuckDB file that holds every intermediate table.

Written here rather than with dagster-duckdb's DuckDBResource because that one retries a locked
file with growing back-off (over a minute and a half) and then raises DuckDB's raw error. A shared
machine needs the opposite: a short bounded wait and a message that names the locked file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl

# The artifact store's folder beside the DuckDB file (refine_af_pipeline/definitions.py default_resources).
ARTIFACTS = "artifacts"


class DatabaseLocked(RuntimeError):
    pass


class Warehouse(dg.ConfigurableResource):
    """DuckDB database file; tables are written whole inside one transaction."""

    database: str
    lock_timeout_s: float = 10.0

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                conn = duckdb.connect(self.database)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                if time.monotonic() >= deadline:
                    raise DatabaseLocked(
                        f"DuckDB file {self.database} is locked by another process (waited "
                        f"{self.lock_timeout_s:.0f} s). Only one run may write it at a time: wait for the "
                        f"other run or stop it. DuckDB said: {exc}"
                    ) from None
                time.sleep(0.5)
        try:
            yield conn
        finally:
            conn.close()

    def table_exists(self, name: str) -> bool:
        with self.connect() as conn:
            return table_exists_on(conn, name)

    def table_columns(self, name: str) -> list[str]:
        """The columns of table `name` in their order; none when the table is missing."""
        with self.connect() as conn:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                    [name],
                ).fetchall()
            ]

    def row_count(self, name: str) -> int:
        with self.connect() as conn:
            return conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] if table_exists_on(conn, name) else 0

    def read_table(self, name: str, order_by: str | None = None) -> pl.DataFrame | None:
        with self.connect() as conn:
            if not table_exists_on(conn, name):
                return None
            sql = f'SELECT * FROM "{name}"' + (f" ORDER BY {order_by}" if order_by else "")
            return conn.execute(sql).pl()

    def latest_run_rows(self, name: str, columns: list[str] | None = None) -> pl.DataFrame | None:
        """The rows of table `name` that the run which wrote it last wrote (column run_id), in the
        order they were written (`columns`: only those, and run_id); None when the table is missing,
        no rows when it is empty. Tables are replaced whole or appended to, so the run of the last
        row is the latest one."""
        select = ", ".join(f'"{c}"' for c in dict.fromkeys(["run_id", *columns])) if columns else "*"
        with self.connect() as conn:
            if not table_exists_on(conn, name):
                return None
            return conn.execute(
                f'SELECT {select} FROM "{name}" WHERE run_id = '
                f'(SELECT run_id FROM "{name}" ORDER BY rowid DESC LIMIT 1) ORDER BY rowid'
            ).pl()

    @property
    def data_dir(self) -> Path:
        """The data folder: the DuckDB file and, beside it, the artifact store's ARTIFACTS folder."""
        return Path(self.database).parent

    def artifact_path(self, stored: str, asset: str, run_id: str) -> Path:
        """Where the artifact that a row of `asset` (written by run `run_id`) records as `stored` is
        in this data folder. Tables record absolute paths, <data folder>/artifacts/<asset>/<run id>/...,
        of the folder that wrote them; a copied or moved data folder holds the same artifact at the
        same place below its own artifacts/ folder, and that place wins whenever it exists, so a copy
        reads its own files. Otherwise the stored path when it exists (an artifact store configured
        outside the data folder), else the place in this folder; a relative stored path is relative
        to the data folder. The result may not exist: the caller says so."""
        path = Path(stored)
        if not path.is_absolute():
            return self.data_dir / path
        parts = path.parts
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] == asset and parts[i + 1] == run_id:
                here = self.data_dir.joinpath(ARTIFACTS, *parts[i:])
                return here if here.exists() or not path.exists() else path
        return path

    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        with self.connect() as conn:
            return conn.execute(sql, params or []).pl()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN ... COMMIT: everything done with it lands together or not at
        all (an exception rolls back; a killed process leaves an uncommitted transaction that DuckDB
        discards when the file is next opened)."""
        with self.connect() as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def write_table(self, name: str, df: pl.DataFrame, mode: str = "replace") -> None:
        """replace: the table becomes `df`; append: `df` is added (table created if missing).
        One transaction, so a crash leaves the previous table as it was."""
        with self.transaction() as conn:
            insert_rows(conn, name, df, mode)


def insert_rows(conn: duckdb.DuckDBPyConnection, name: str, df: pl.DataFrame, mode: str = "append") -> None:
    """Write `df` into table `name` on `conn` (inside the caller's transaction, if any)."""
    if mode not in ("replace", "append"):
        raise ValueError(f"unknown write mode {mode}")
    conn.register("incoming", df.to_arrow())
    try:
        if mode == "replace" or not table_exists_on(conn, name):
            conn.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT * FROM incoming')
        else:
            _add_missing_columns(conn, name)
            conn.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM incoming')
    finally:
        conn.unregister("incoming")


def _add_missing_columns(conn: duckdb.DuckDBPyConnection, name: str) -> None:
    """Columns that `incoming` adds to every column of table `name` (a provenance column of a
    later version) are added to the table; its older rows read NULL there. Rows that lack one of
    the table's columns are not a newer version of it, and the insert fails on them."""
    have = {row[0] for row in conn.execute(f'DESCRIBE "{name}"').fetchall()}
    incoming = conn.execute("DESCRIBE SELECT * FROM incoming").fetchall()
    if not have <= {row[0] for row in incoming}:
        return
    for column, column_type, *_ in incoming:
        if column not in have:
            conn.execute(f'ALTER TABLE "{name}" ADD COLUMN "{column}" {column_type}')


def table_exists_on(conn: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0]
    )
