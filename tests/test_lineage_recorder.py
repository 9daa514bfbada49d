"""The lineage recorder (tests/warehouse_recorder.py) on toy assets: no models, a DuckDB file in
tmp_path, a few seconds."""

import dagster as dg
import polars as pl
import pytest
from warehouse_recorder import (
    RecordingWarehouse,
    UnparsedStatement,
    lineage_violations,
    load_records,
    statement_tables,
)

from resources.batch_ledger import BatchLedger
from resources.warehouse import Warehouse, insert_rows

pytestmark = pytest.mark.unit


def _keys(n: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"k": list(range(n))})


@dg.asset
def a(warehouse: Warehouse) -> None:
    warehouse.write_table("a", _keys())


@dg.asset(deps=[a])
def b(warehouse: Warehouse) -> None:
    warehouse.write_table("b", warehouse.read_table("a"))


@dg.asset
def c(warehouse: Warehouse) -> None:
    warehouse.write_table("c", warehouse.read_table("a"))  # a is not among c's deps


@dg.asset
def d(warehouse: Warehouse) -> None:
    warehouse.write_table("e", _keys())  # writes a table that is not its own


@dg.multi_asset(specs=[dg.AssetSpec("m1", deps=[a]), dg.AssetSpec("m2")])
def m(warehouse: Warehouse):
    source = warehouse.read_table("a")
    with warehouse.transaction() as conn:
        insert_rows(conn, "m1", source, mode="replace")
        insert_rows(conn, "m2", source, mode="replace")
    yield dg.MaterializeResult(asset_key="m1")
    yield dg.MaterializeResult(asset_key="m2")


@dg.asset
def staged(context: dg.AssetExecutionContext, warehouse: Warehouse) -> None:
    # The project's generation pattern: plan, commit batches to the staging table, publish.
    ledger = BatchLedger(warehouse, "staged")
    plan = ledger.unfinished_plan() or ledger.start_plan(context.run_id, {"seed": 0}, [[0, 1], [2]])
    for batch in plan.pending():
        rows = pl.DataFrame({"k": batch.inputs, "run_id": [plan.plan_id] * len(batch.inputs)})
        ledger.commit_batch(plan, batch, "staged_batches", rows, context.run_id)
    done = warehouse.query('SELECT k FROM "staged_batches" WHERE run_id = ?', [plan.plan_id])
    ledger.finish(plan, context.run_id, replace={"staged": done}, clear_rows_of="staged_batches")


_JOINED = "SELECT count(*) AS n FROM b JOIN a USING (k)"


@dg.asset_check(asset=b)
def b_matches_a(warehouse: Warehouse) -> dg.AssetCheckResult:
    # a is b's upstream, but the check itself does not declare it.
    return dg.AssetCheckResult(passed=bool(warehouse.query(_JOINED)["n"][0]))


@dg.asset_check(asset=b, additional_deps=[a])
def b_covers_a(warehouse: Warehouse) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=bool(warehouse.query(_JOINED)["n"][0]))


DEFS = [a, b, c, d, m, staged, b_matches_a, b_covers_a]


@pytest.fixture
def warehouse(tmp_path) -> RecordingWarehouse:
    return RecordingWarehouse(database=str(tmp_path / "w.duckdb"), record_file=str(tmp_path / "lineage.jsonl"))


def _step(record: dict) -> str:
    return ",".join(record["assets"]) or ",".join(".".join(c) for c in record["checks"])


def test_undeclared_reads_and_writes_are_flagged_and_declared_ones_are_not(warehouse):
    resources = {"warehouse": warehouse}
    # a first: read_table of a missing table issues only the existence probe, so c's read of a
    # would leave no trace if c ran before a.
    assert dg.materialize(DEFS, selection=["a"], resources=resources).success
    rest = (dg.AssetSelection.all() | dg.AssetSelection.all_asset_checks()) - dg.AssetSelection.assets("a")
    assert dg.materialize(DEFS, selection=rest, resources=resources).success

    records = load_records(warehouse.record_file)
    assert {_step(r) for r in records} == {"a", "b", "c", "d", "m1,m2", "staged", "b.b_matches_a", "b.b_covers_a"}
    touched = {(_step(r), t) for r in records for t in r["reads"] + r["writes"]}
    # What the clean steps did, so "no violation" below means they were seen and allowed.
    assert {
        ("b", "a"),
        ("b", "b"),
        ("m1,m2", "a"),
        ("m1,m2", "m1"),
        ("m1,m2", "m2"),
        ("b.b_covers_a", "a"),
        ("staged", "generation_plans"),
        ("staged", "generation_plan_batches"),
        ("staged", "staged_batches"),
        ("staged", "staged"),
    } <= touched
    assert not {t for _, t in touched} & {"incoming", "tables"}  # registered view, information_schema

    assert set(lineage_violations(records, DEFS)) == {
        "asset step c reads table 'a', which it does not declare (declared inputs: none)",
        "asset step d writes table 'e', which is not its own (own tables: d)",
        "check step b.b_matches_a reads table 'a', which it does not declare (declared inputs: b)",
    }


def test_statements_outside_a_step_are_not_recorded(warehouse):
    warehouse.write_table("a", _keys())
    assert warehouse.read_table("a").height == 3
    assert load_records(warehouse.record_file) == []


def test_every_warehouse_method_goes_through_the_recorder(warehouse):
    new_records = {}

    @dg.asset
    def probe(warehouse: Warehouse) -> None:
        def in_transaction():
            with warehouse.transaction() as conn:
                conn.execute("DELETE FROM probe WHERE k < 0")

        calls = {
            "write_table": lambda: warehouse.write_table("probe", _keys()),
            "table_exists": lambda: warehouse.table_exists("probe"),
            "row_count": lambda: warehouse.row_count("probe"),
            "read_table": lambda: warehouse.read_table("probe"),
            "query": lambda: warehouse.query("SELECT k FROM probe WHERE k > ?", [0]),
            "transaction": in_transaction,
        }
        for name, call in calls.items():
            before = len(load_records(warehouse.record_file))
            call()
            new_records[name] = len(load_records(warehouse.record_file)) - before

    assert dg.materialize([probe], resources={"warehouse": warehouse}).success
    assert len(new_records) == 6 and all(new_records.values()), new_records
    records = load_records(warehouse.record_file)
    assert {t for r in records for t in r["reads"] + r["writes"]} == {"probe"}
    assert lineage_violations(records, [probe]) == []


def test_staging_tables_are_allowed_only_to_their_asset_and_unknowns_are_reported():
    def record(assets, writes=(), error=None):
        return {"assets": assets, "checks": [], "reads": [], "writes": list(writes), "error": error}

    records = [
        record(["b"], ["b_batches", "generation_plans"]),
        record(["b"], ["staged_batches"]),
        record(["nowhere"], ["nowhere"]),
        record(["b"], error="syntax error"),
    ]
    assert lineage_violations(records, dg.Definitions(assets=[a, b, staged])) == [
        "asset step b writes table 'staged_batches', which is not its own (own tables: b)",
        "asset step nowhere: nowhere not in the given definitions",
        "asset step b: statement not understood (syntax error)",
    ]


@pytest.mark.parametrize(
    ("sql", "reads", "writes"),
    [
        # resources/warehouse.py
        ('CREATE OR REPLACE TABLE "x" AS SELECT * FROM incoming', set(), {"x"}),
        ('INSERT INTO "x" BY NAME SELECT * FROM incoming', set(), {"x"}),
        ('SELECT count(*) FROM "x"', {"x"}, set()),
        ("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", set(), set()),
        ("BEGIN TRANSACTION", set(), set()),
        # resources/batch_ledger.py
        (
            """CREATE TABLE IF NOT EXISTS generation_plans (
        plan_id VARCHAR, asset VARCHAR, n_batches INTEGER)""",
            set(),
            {"generation_plans"},
        ),
        ("INSERT INTO generation_plans VALUES (?, ?, 'open', ?, ?, ?, NULL, NULL)", set(), {"generation_plans"}),
        (
            "UPDATE generation_plan_batches SET committed_at = ?, committed_by_run_id = ?, rows_written = ? "
            "WHERE plan_id = ? AND asset = ? AND batch_index = ?",
            set(),
            {"generation_plan_batches"},
        ),
        ('DELETE FROM "x_batches" WHERE run_id = ?', set(), {"x_batches"}),
        # assets/instructions.py
        (
            "SELECT * FROM raw_instructions WHERE run_id = ? ORDER BY prompt_index, position_in_response",
            {"raw_instructions"},
            set(),
        ),
        # what a regex would get wrong: CTE names, FROM inside EXTRACT, subqueries, quoting and schemas
        ('WITH w AS (SELECT * FROM a) SELECT extract(year FROM ts) FROM w JOIN main."B" USING (k)', {"a", "b"}, set()),
        ("UPDATE t AS u SET v = (SELECT max(v) FROM s) FROM r WHERE u.k = r.k", {"s", "r"}, {"t"}),
        ("DROP TABLE IF EXISTS old; ALTER TABLE t RENAME TO t2", set(), {"old", "t", "t2"}),
    ],
)
def test_sql_is_split_into_reads_and_writes(sql, reads, writes):
    assert statement_tables(sql, views={"incoming"}) == (reads, writes)


def test_registered_views_are_not_tables_and_unsupported_statements_are_refused():
    assert statement_tables("SELECT * FROM incoming JOIN a USING (k)") == ({"incoming", "a"}, set())
    assert statement_tables("SELECT * FROM incoming JOIN a USING (k)", views={"INCOMING"}) == ({"a"}, set())
    with pytest.raises(UnparsedStatement):
        statement_tables("COPY a TO 'a.csv'")
