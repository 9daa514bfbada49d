"""The batch ledger behind crash-resume (resources/batch_ledger.py), without a model."""

import duckdb
import polars as pl
import pytest

from resources import Warehouse
from resources.batch_ledger import BatchLedger, LedgerError

pytestmark = pytest.mark.unit


@pytest.fixture
def warehouse(tmp_path):
    return Warehouse(database=str(tmp_path / "w.duckdb"))


def _rows(plan_id: str, batch: int, n: int = 2) -> pl.DataFrame:
    return pl.DataFrame({"row_id": [f"{batch}-{k}" for k in range(n)], "run_id": [plan_id] * n, "text": ["x"] * n})


def test_a_plan_resumes_where_it_stopped(warehouse):
    ledger = BatchLedger(warehouse, "stage")
    assert ledger.unfinished_plan() is None
    plan = ledger.start_plan("run-a", {"seed": 7}, [["p0", "p1"], ["p2"], ["p3"]])
    assert [b.inputs for b in plan.pending()] == [["p0", "p1"], ["p2"], ["p3"]]
    ledger.commit_batch(plan, plan.batches[0], "out", _rows("run-a", 0), "run-a")
    ledger.commit_batch(plan, plan.batches[2], "out", _rows("run-a", 2), "run-a")
    # What a new process sees after the first one died here:
    again = ledger.unfinished_plan()
    assert again.resumed and again.plan_id == "run-a" and again.settings == {"seed": 7}
    assert [b.index for b in again.pending()] == [1] and again.pending()[0].inputs == ["p2"]
    ledger.commit_batch(again, again.batches[1], "out", _rows("run-a", 1), "run-b")
    ledger.finish(again, "run-b")
    assert ledger.unfinished_plan() is None
    log = ledger.batch_log()
    assert log["committed_by_run_id"].to_list() == ["run-a", "run-b", "run-a"]
    assert sorted(warehouse.read_table("out")["row_id"]) == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]


def test_a_batch_is_committed_once_and_a_failed_commit_leaves_nothing(warehouse):
    ledger = BatchLedger(warehouse, "stage")
    plan = ledger.start_plan("run-a", {}, [[0], [1]])
    ledger.commit_batch(plan, plan.batches[0], "out", _rows("run-a", 0), "run-a")
    with pytest.raises(LedgerError, match="batch 0 is already committed"):
        ledger.commit_batch(plan, plan.batches[0], "out", _rows("run-a", 0), "run-a")
    with pytest.raises(duckdb.Error):  # rows that do not fit the table: the batch mark is rolled back too
        ledger.commit_batch(plan, plan.batches[1], "out", pl.DataFrame({"other": [1]}), "run-a")
    assert [b.index for b in ledger.unfinished_plan().pending()] == [1]
    assert warehouse.row_count("out") == 2
    with pytest.raises(LedgerError, match="already has an unfinished plan"):
        ledger.start_plan("run-b", {}, [[0]])


def test_finish_publishes_staged_rows_in_the_same_transaction(warehouse):
    ledger = BatchLedger(warehouse, "pairs")
    warehouse.write_table("pairs", pl.DataFrame({"row_id": ["old"], "run_id": ["run-0"], "text": ["old"]}))
    plan = ledger.start_plan("run-a", {}, [[0], [1]])
    for batch in plan.batches:
        ledger.commit_batch(plan, batch, "pairs_batches", _rows("run-a", batch.index), "run-a")
    assert warehouse.read_table("pairs")["row_id"].to_list() == ["old"]  # unchanged until finished
    staged = warehouse.query("SELECT * FROM pairs_batches WHERE run_id = 'run-a' ORDER BY row_id")
    ledger.finish(plan, "run-a", replace={"pairs": staged}, clear_rows_of="pairs_batches")
    assert warehouse.read_table("pairs", order_by="row_id")["row_id"].to_list() == ["0-0", "0-1", "1-0", "1-1"]
    assert warehouse.row_count("pairs_batches") == 0


def test_an_abandoned_plan_is_not_resumed(warehouse):
    ledger = BatchLedger(warehouse, "stage")
    plan = ledger.start_plan("run-a", {}, [[0], [1]])
    ledger.finish(plan, "run-b", status="abandoned")
    assert ledger.unfinished_plan() is None
    assert ledger.start_plan("run-b", {}, [[0]]).plan_id == "run-b"


def test_a_batch_written_to_two_tables_lands_in_both_or_neither(warehouse):
    ledger = BatchLedger(warehouse, "stage")
    plan = ledger.start_plan("run-a", {}, [[0], [1]])
    decisions = pl.DataFrame({"row_id": ["0-0", "0-1"], "decision": ["kept", "rejected"]})
    ledger.commit_batch(plan, plan.batches[0], "out", _rows("run-a", 0), "run-a", also_append={"decided": decisions})
    assert warehouse.read_table("decided")["decision"].to_list() == ["kept", "rejected"]
    # The second table rejects this frame (a column it does not have): the first table's rows and
    # the ledger mark are rolled back with it.
    bad = pl.DataFrame({"row_id": ["1-0"], "not_a_column": [1]})
    with pytest.raises(Exception, match="not_a_column"):
        ledger.commit_batch(plan, plan.batches[1], "out", _rows("run-a", 1), "run-a", also_append={"decided": bad})
    assert warehouse.row_count("out") == 2 and warehouse.row_count("decided") == 2
    assert [b.index for b in ledger.unfinished_plan().pending()] == [1]


class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, line):
        self.lines.append(line)


def test_an_unfinished_plan_is_resumed_or_abandoned_with_its_reason_said(warehouse):
    ledger = BatchLedger(warehouse, "stage")
    plan = ledger.start_plan("run-a", {"adapter": "old"}, [[0], [1]])
    ledger.commit_batch(plan, plan.batches[0], "stage_batches", _rows("run-a", 0), "run-a")
    log = _Log()
    resumed = ledger.take_unfinished("run-b", log, lambda p: None)
    assert resumed.plan_id == "run-a" and [b.index for b in resumed.pending()] == [1]
    assert log.lines == [
        "resuming the unfinished plan of run run-a: 1 of 2 batches committed before it stopped; "
        "generating the 1 missing ones with that plan's inputs and settings"
    ]
    why = lambda p: None if p.settings["adapter"] == "new" else f"made with {p.settings['adapter']}"  # noqa: E731
    assert ledger.take_unfinished("run-b", log, why, clear_rows_of="stage_batches") is None
    assert log.lines[-1] == "abandoned the unfinished plan of run run-a (1 of 2 batches committed): made with old"
    assert ledger.unfinished_plan() is None and warehouse.row_count("stage_batches") == 0
    assert ledger.take_unfinished("run-c", log, why) is None and len(log.lines) == 2  # nothing left to take


def test_a_plans_queries_are_every_run_that_worked_on_it(warehouse):
    ledger = BatchLedger(warehouse, "stage")
    plan = ledger.start_plan("run-a", {}, [[0], [1], [2]], {"judge": 1})  # run a labelled before planning
    assert ledger.latest_plan()["llm_queries"] == '{"judge": 1}'
    ledger.commit_batch(plan, plan.batches[0], "out", _rows("run-a", 0), "run-a", queries={"generator": 4, "judge": 3})
    # Run a dies making batch 1: its queries there are lost with the batch, which the next run makes again.
    again = ledger.unfinished_plan()
    assert again.queries_before == {"generator": 4, "judge": 3}
    for batch in again.pending():
        ledger.commit_batch(
            again, batch, "out", _rows("run-a", batch.index), "run-b", queries={"generator": 4 * batch.index}
        )
    ledger.finish(again, "run-b", queries={"generator": 8, "judge": 2})
    latest = ledger.latest_plan()
    assert latest["plan_id"] == "run-a" and latest["status"] == "finished"
    assert latest["llm_queries"] == '{"generator": 12, "judge": 5}'
    # A run with nothing to generate: a plan of no batches, closed at once, with its (zero) queries.
    ledger.record_empty_plan("run-c", {"target_pool_size": 5}, "skipped_at_target", {"generator": 0, "judge": 0})
    latest = ledger.latest_plan()
    assert (latest["plan_id"], latest["status"], latest["n_batches"]) == ("run-c", "skipped_at_target", 0)
    assert latest["llm_queries"] == '{"generator": 0, "judge": 0}' and latest["finished_by_run_id"] == "run-c"
    assert ledger.unfinished_plan() is None and BatchLedger(warehouse, "other").latest_plan() is None


def test_a_plan_from_a_ledger_without_query_counts_is_resumed_and_counted(warehouse):
    with duckdb.connect(warehouse.database) as conn:  # the ledger's tables as an earlier version made them
        conn.execute(
            "CREATE TABLE generation_plans (plan_id VARCHAR, asset VARCHAR, status VARCHAR, settings VARCHAR, "
            "n_batches INTEGER, created_at TIMESTAMP, finished_at TIMESTAMP, finished_by_run_id VARCHAR)"
        )
        conn.execute(
            "CREATE TABLE generation_plan_batches (plan_id VARCHAR, asset VARCHAR, batch_index INTEGER, "
            "inputs VARCHAR, committed_at TIMESTAMP, committed_by_run_id VARCHAR, rows_written INTEGER)"
        )
        conn.execute("INSERT INTO generation_plans VALUES ('run-a', 'stage', 'open', '{}', 1, now(), NULL, NULL)")
        conn.execute("INSERT INTO generation_plan_batches VALUES ('run-a', 'stage', 0, '[0]', NULL, NULL, NULL)")
    ledger = BatchLedger(warehouse, "stage")
    assert "llm_queries" not in ledger.latest_plan()
    plan = ledger.unfinished_plan()
    assert plan.queries_before == {}
    ledger.commit_batch(plan, plan.batches[0], "out", _rows("run-a", 0), "run-b", queries={"generator": 2})
    ledger.finish(plan, "run-b", queries={"generator": 2})
    assert ledger.latest_plan()["llm_queries"] == '{"generator": 2}'
    ledger.start_plan("run-c", {}, [[0]])  # and new plans go into the same table
    assert ledger.latest_plan()["plan_id"] == "run-c" and ledger.latest_plan()["llm_queries"] is None
