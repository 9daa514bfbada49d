"""Record which DuckDB tables each asset step and asset-check step reads and writes through the
Warehouse resource, and check those against the declared asset graph.

Use RecordingWarehouse in place of Warehouse, materialize, then
`lineage_violations(load_records(path), definitions)`. Records go to a JSONL file (one line per
statement, appended) so steps that run in subprocesses are recorded too.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import dagster as dg
import duckdb

from resources.warehouse import Warehouse

# The batch ledger's own tables (resources/batch_ledger.py): every generation stage writes its
# plan there, so they are part of the Warehouse resource, not of any asset's lineage.
ALLOWED_INTERNAL_TABLES = frozenset({"generation_plans", "generation_plan_batches"})


def staging_table(asset: str) -> str:
    """The batches table a generation stage fills before publishing (assets/instance_pairs.py
    `_staging`); only that asset may touch it."""
    return f"{asset}_batches"


# ---------------------------------------------------------------- SQL -> tables

# DuckDB's parser does the hard part (subqueries, CTEs, joins, `EXTRACT(year FROM ts)` which a
# FROM-regex would take for a table). But json_serialize_sql only serializes SELECT, and
# get_table_names binds the statement (an INSERT into a table that does not exist yet raises a
# CatalogException; UPDATE/DELETE fail on a fresh connection). So the statement's type comes from
# duckdb.extract_statements (parse only), a regex takes the write target off the front, and what
# remains is rewritten into a SELECT whose tables are the reads.
_NAME = r'(?:"(?:[^"]|"")+"|\w+)(?:\s*\.\s*(?:"(?:[^"]|"")+"|\w+))*'
_WRITE = re.compile(
    r"""\s*(?P<verb>
        CREATE\s+(?:OR\s+REPLACE\s+)?(?:TEMP(?:ORARY)?\s+)?(?:TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?
      | INSERT\s+(?:OR\s+(?:REPLACE|IGNORE)\s+)?INTO\s+
      | UPDATE\s+
      | DELETE\s+FROM\s+
      | DROP\s+(?:TABLE|VIEW)\s+(?:IF\s+EXISTS\s+)?
      | ALTER\s+(?:TABLE|VIEW)\s+(?:IF\s+EXISTS\s+)?
    )(?P<name>"""
    + _NAME
    + r")(?P<rest>.*)",
    re.IGNORECASE | re.DOTALL | re.VERBOSE,
)
_ALIAS = r"(?:\s+(?:AS\s+)?(?!SET\b|USING\b|WHERE\b|RETURNING\b)\w+)?"
_NO_TABLES = {
    duckdb.StatementType.TRANSACTION,
    duckdb.StatementType.SET,
    duckdb.StatementType.VARIABLE_SET,
    duckdb.StatementType.PRAGMA,
    duckdb.StatementType.LOAD,
}
_SYSTEM_SCHEMAS = {"information_schema", "pg_catalog"}
_parser = duckdb.connect()  # in-memory, only ever used to parse
_parser_lock = threading.Lock()
# Catalog views such as duckdb_tables or pg_tables, which a query may name without a schema.
_SYSTEM_VIEWS = {name for (name,) in _parser.execute("SELECT view_name FROM duckdb_views() WHERE internal").fetchall()}


class UnparsedStatement(ValueError):
    """A statement whose tables this module cannot tell; reported, never silently skipped."""


def _unquote(name: str) -> str:
    # DuckDB matches identifiers case-insensitively even when quoted; a schema prefix is dropped
    # because table name == asset name.
    last = re.findall(r'"((?:[^"]|"")+)"|(\w+)', name)[-1]
    return (last[0].replace('""', '"') if last[0] else last[1]).lower()


def _select_tables(select_sql: str) -> set[str]:
    with _parser_lock:
        tree = json.loads(_parser.execute("SELECT json_serialize_sql(?)", [select_sql]).fetchone()[0])
    if tree["error"]:
        raise UnparsedStatement(f"{tree['error_message']}: {select_sql}")
    tables, ctes = set(), set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "BASE_TABLE":
                if (
                    node["schema_name"].lower() not in _SYSTEM_SCHEMAS
                    and node["table_name"].lower() not in _SYSTEM_VIEWS
                ):
                    tables.add(node["table_name"].lower())
            for entry in node.get("cte_map", {}).get("map", []):
                ctes.add(entry["key"].lower())
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree["statements"])
    return tables - ctes


def _write_statement_tables(sql: str) -> tuple[set[str], set[str]]:
    match = _WRITE.match(sql)
    if match is None:
        raise UnparsedStatement(f"no write target found: {sql}")
    verb = match["verb"].split()[0].upper()
    target, rest = _unquote(match["name"]), match["rest"].strip().rstrip(";")
    writes, query = {target}, None
    if verb == "CREATE":
        query = re.match(r"AS\s+(.*)", rest, re.IGNORECASE | re.DOTALL)
        query = query and query[1]  # `CREATE TABLE t (col TYPE, ...)` reads nothing
    elif verb == "INSERT":
        rest = re.sub(r"^BY\s+(?:NAME|POSITION)\s*", "", rest, flags=re.IGNORECASE)
        rest = re.sub(r"^\((?!\s*(?:SELECT|WITH|FROM|VALUES)\b)[^()]*\)\s*", "", rest, flags=re.IGNORECASE)
        query = None if re.match(r"DEFAULT\s+VALUES", rest, re.IGNORECASE) else rest
    elif verb == "UPDATE":
        # `UPDATE t SET a = x FROM u WHERE c` has the same tables as `SELECT a = x FROM u WHERE c`.
        rest = re.sub(r"^" + _ALIAS + r"\s*SET\b", "SELECT", " " + rest, flags=re.IGNORECASE)
        query = rest
    elif verb == "DELETE":
        # `DELETE FROM t USING u WHERE c` likewise reads what `SELECT 1 FROM u WHERE c` reads.
        rest = re.sub(r"^" + _ALIAS + r"\s*(?=USING\b|WHERE\b|$)", "", " " + rest, flags=re.IGNORECASE)
        query = "SELECT 1 " + re.sub(r"^USING\b", "FROM", rest, flags=re.IGNORECASE)
    elif verb == "ALTER":
        renamed = re.match(r"RENAME\s+TO\s+(" + _NAME + ")", rest, re.IGNORECASE)
        if renamed:
            writes.add(_unquote(renamed[1]))
    reads = _select_tables(query) if query else set()
    return reads - writes, writes


@lru_cache(maxsize=4096)
def _parse(sql: str) -> tuple[frozenset[str], frozenset[str]]:
    reads, writes = set(), set()
    for statement in duckdb.extract_statements(sql):
        if statement.type in _NO_TABLES:
            continue
        if statement.type == duckdb.StatementType.SELECT:
            r, w = _select_tables(statement.query), set()
        elif statement.type in (
            duckdb.StatementType.CREATE,
            duckdb.StatementType.INSERT,
            duckdb.StatementType.UPDATE,
            duckdb.StatementType.DELETE,
            duckdb.StatementType.DROP,
            duckdb.StatementType.ALTER,
        ):
            r, w = _write_statement_tables(statement.query)
        else:  # COPY, ATTACH, EXPORT, ...: not used by the project, so not worth guessing
            raise UnparsedStatement(f"{statement.type.name} statements are not supported: {sql}")
        reads |= r
        writes |= w
    return frozenset(reads - writes), frozenset(writes)


def statement_tables(sql: str, views: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """(tables read, tables written) by `sql`, leaving out catalog tables and the connection's
    registered views (`views`). A table both read and written counts as written. Raises
    UnparsedStatement when the statement is beyond this parser."""
    reads, writes = _parse(sql)
    views = {v.lower() for v in views}
    return set(reads) - views, set(writes) - views


# ---------------------------------------------------------------- recording


def _current_step() -> dict | None:
    """The asset or asset-check step running now, or None outside any step. Inside a check step
    AssetExecutionContext.get() raises; inside an asset step AssetCheckExecutionContext.get()
    does; outside a step both do."""
    try:
        context = dg.AssetExecutionContext.get()
        assets = sorted(key.path[-1] for key in context.selected_asset_keys)
    except dg.DagsterInvariantViolationError:
        try:
            context = dg.AssetCheckExecutionContext.get()
        except dg.DagsterInvariantViolationError:
            return None
        assets = []
    checks = sorted([key.asset_key.path[-1], key.name] for key in context.selected_asset_check_keys)
    # AssetCheckExecutionContext has no run_id of its own; both wrap an OpExecutionContext.
    return {"run_id": context.op_execution_context.run_id, "assets": assets, "checks": checks}


class _RecordingConnection:
    """A duckdb connection that writes each statement's tables to the record file first (so a
    statement that fails still counts), then runs it."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, record_file: str):
        self._conn = conn
        self._record_file = record_file
        self._views: set[str] = set()  # names registered on this connection, e.g. "incoming"

    def _record(self, query) -> None:
        step = _current_step()
        if step is None:
            return
        sql = getattr(query, "query", query)  # a duckdb Statement or a string
        try:
            reads, writes = statement_tables(sql, self._views)
            error = None
        except (UnparsedStatement, duckdb.Error) as exc:
            reads, writes, error = set(), set(), str(exc)
        line = json.dumps({**step, "sql": sql, "reads": sorted(reads), "writes": sorted(writes), "error": error})
        with open(self._record_file, "a") as f:
            f.write(line + "\n")  # one write per line: appends from several processes don't interleave

    def _returned(self, result):
        # execute() returns the connection itself; keep chained calls on the proxy.
        return self if result is self._conn else result

    def execute(self, query, *args, **kwargs):
        self._record(query)
        return self._returned(self._conn.execute(query, *args, **kwargs))

    def executemany(self, query, *args, **kwargs):
        self._record(query)
        return self._returned(self._conn.executemany(query, *args, **kwargs))

    def sql(self, query, *args, **kwargs):
        self._record(query)
        return self._conn.sql(query, *args, **kwargs)

    query = sql

    def register(self, view_name: str, python_object):
        self._views.add(view_name.lower())
        return self._returned(self._conn.register(view_name, python_object))

    def unregister(self, view_name: str):
        self._views.discard(view_name.lower())
        return self._returned(self._conn.unregister(view_name))

    def __getattr__(self, name):
        return getattr(self._conn, name)


class RecordingWarehouse(Warehouse):
    """Warehouse that records every statement made in an asset or check step to `record_file`.
    Every Warehouse method (read_table, query, write_table, transaction, table_exists,
    row_count) and the batch ledger open their connection through connect(), so this override
    sees them all."""

    record_file: str

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.record_file).parent.mkdir(parents=True, exist_ok=True)
        with super().connect() as conn:
            yield _RecordingConnection(conn, self.record_file)


def load_records(path: str | Path) -> list[dict]:
    """The records written so far; none if no step has used the warehouse yet."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- checking


def _declared_graph(definitions) -> tuple[dict[str, set[str]], dict[tuple[str, str], set[str]]]:
    """({asset: upstream assets}, {(asset, check): assets the check declares}), by table name."""
    # Read the specs off the definitions themselves: wrapping a list in dg.Definitions would
    # demand the resources the assets require.
    if isinstance(definitions, dg.Definitions):
        definitions = [*(definitions.assets or []), *(definitions.asset_checks or [])]
    assets, checks = {}, {}
    for item in definitions:
        asset_specs = [item] if isinstance(item, dg.AssetSpec) else getattr(item, "specs", [])
        for spec in asset_specs:
            assets[spec.key.path[-1]] = {dep.asset_key.path[-1] for dep in spec.deps}
        for spec in getattr(item, "check_specs", []):  # AssetsDefinition, AssetChecksDefinition
            checks[spec.asset_key.path[-1], spec.name] = {spec.asset_key.path[-1]} | {
                dep.asset_key.path[-1] for dep in spec.additional_deps
            }
    return assets, checks


def _names(tables: Iterable[str]) -> str:
    return ", ".join(sorted(tables)) or "none"


def lineage_violations(records: Iterable[dict], definitions) -> list[str]:
    """One line per (step, table, read/write) that the declared graph does not allow.

    An asset step may read its own assets' tables, their declared upstream assets' tables and the
    additional deps of checks run in that step; it may write only its own assets' tables. A check
    step may read the checked asset and the check's additional deps, and write nothing. Both may
    read and write ALLOWED_INTERNAL_TABLES, and each asset its own staging table."""
    assets, checks = _declared_graph(definitions)
    found: dict[str, None] = {}  # ordered set: a table read many times is reported once
    for record in records:
        own = record["assets"]
        check_keys = [tuple(c) for c in record["checks"]]
        who = f"asset step {', '.join(own)}" if own else f"check step {', '.join(f'{a}.{c}' for a, c in check_keys)}"
        unknown = [a for a in own if a not in assets] + [f"{a}.{c}" for a, c in check_keys if (a, c) not in checks]
        if unknown:
            found[f"{who}: {_names(unknown)} not in the given definitions"] = None
            continue
        if record["error"]:
            found[f"{who}: statement not understood ({record['error']})"] = None
            continue
        checked = set().union(*(checks[c] for c in check_keys))
        upstream = set().union(*(assets[a] for a in own))
        staging = {staging_table(a) for a in own}
        may_write = set(own) | staging | ALLOWED_INTERNAL_TABLES
        may_read = may_write | upstream | checked
        for table in record["writes"]:
            if table not in may_write:
                found[f"{who} writes table {table!r}, which is not its own (own tables: {_names(own)})"] = None
        for table in record["reads"]:
            if table not in may_read:
                declared = _names((upstream | checked) - set(own))
                found[f"{who} reads table {table!r}, which it does not declare (declared inputs: {declared})"] = None
    return list(found)
