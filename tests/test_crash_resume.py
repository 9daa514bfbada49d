"""Crash-resume of the generation stages: a materialization killed with SIGKILL between batch
commits is finished by the next one, which generates only the missing batches."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
from pipeline_helpers import copy_data_dir, instance_for, materialize, smallest_run_config

pytestmark = pytest.mark.slow  # minutes of tiny-model graph runs: out of make test-fast

CHILD = Path(__file__).parent / "materialize_child.py"
BATCH_SIZE = 2
BOOTSTRAP = ["raw_instructions", "deduplicated_instructions", "instruction_pool"]  # one step writes the three
RAW_CONFIG = {"num_prompts": 8, "classification_prompts": 1, "max_new_tokens": 48}


def _query(db: Path, sql: str, params=None, timeout_s: float = 60) -> pl.DataFrame | None:
    """Read with a short-lived read-only connection, waiting while the writer holds the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with duckdb.connect(str(db), read_only=True) as conn:
                return conn.execute(sql, params or []).pl()
        except duckdb.CatalogException:
            return None  # the table is not there yet
        except duckdb.IOException as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{db} stayed locked for {timeout_s} s: {exc}") from None
            time.sleep(0.1)


def _committed_batches(db: Path, asset: str) -> tuple[int, int]:
    """(committed, planned) batches of the asset's newest plan; (0, 0) before the plan exists."""
    if not db.exists():
        return 0, 0
    df = _query(
        db,
        "SELECT count(*) AS planned, count(committed_at) AS committed FROM generation_plan_batches "
        "WHERE asset = ? AND plan_id = (SELECT plan_id FROM generation_plans WHERE asset = ? "
        "ORDER BY created_at DESC LIMIT 1)",
        [asset, asset],
    )
    return (0, 0) if df is None else (int(df["committed"][0]), int(df["planned"][0]))


def kill_mid_generation(
    data_dir: Path, model: str, asset: str, run_config: dict, timeout_s: float = 300, select: list[str] | None = None
) -> tuple[int, int]:
    """Start materializing `select` (default: `asset`) in a child process, SIGKILL it once at least
    one batch but not every batch of `asset`'s plan is committed; return (committed, planned)
    batches as the kill left them."""
    db = data_dir / "refine_af.duckdb"
    child = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            "--data-dir",
            str(data_dir),
            "--model",
            model,
            "--select",
            ",".join(select or [asset]),
            "--run-config",
            json.dumps(run_config),
            "--batch-size",
            str(BATCH_SIZE),
            "--slow-batch-seconds",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            committed, planned = _committed_batches(db, asset)
            if committed >= 1:
                break
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no batch of {asset} was committed (child exit {child.poll()}):\n"
                    f"{child.communicate(timeout=30)[0][-4000:] if child.poll() is not None else ''}"
                )
            time.sleep(0.1)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"the child ended on its own ({child.returncode}) before the kill"
    return _committed_batches(db, asset)


def _plan_log(db: Path, asset: str) -> pl.DataFrame:
    return _query(
        db,
        "SELECT p.plan_id, p.status, b.batch_index, b.committed_by_run_id, b.rows_written "
        "FROM generation_plans p JOIN generation_plan_batches b USING (plan_id, asset) "
        "WHERE asset = ? ORDER BY b.batch_index",
        [asset],
    )


def test_killed_raw_instructions_run_is_finished_without_regenerating(tiny_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    db = data_dir / "refine_af.duckdb"
    assert materialize(data_dir, str(tiny_model_dir), {}, selection=["seed_pool"]).success
    committed, planned = kill_mid_generation(
        data_dir, str(tiny_model_dir), "raw_instructions", {"bootstrap_instructions": RAW_CONFIG}, select=BOOTSTRAP
    )
    assert planned == 4 and 1 <= committed < planned, (committed, planned)
    before = _query(db, "SELECT * FROM raw_instructions ORDER BY instruction_id")
    [plan_id] = set(before["run_id"])
    # Whole batches only: each committed batch wrote its 2 prompts' rows, nothing else is there,
    # and their decisions went in with them.
    assert sorted(set(before["prompt_index"])) == list(range(BATCH_SIZE * committed))
    decided_before = _query(db, "SELECT * FROM deduplicated_instructions ORDER BY instruction_id")
    assert decided_before["instruction_id"].to_list() == before["instruction_id"].to_list()

    resumed = materialize(
        data_dir,
        str(tiny_model_dir),
        {"bootstrap_instructions": RAW_CONFIG},
        selection=BOOTSTRAP,
        batch_size=BATCH_SIZE,
    )
    [metadata] = [
        {k: v.value for k, v in m.metadata.items()}
        for m in resumed.asset_materializations_for_node("bootstrap_instructions")
        if m.asset_key == dg.AssetKey("raw_instructions")
    ]
    assert metadata["resumed_plan"] is True and metadata["plan_run_id"] == plan_id
    assert metadata["batches_committed_before_this_run"] == committed
    assert metadata["batches_generated"] == planned - committed

    after = _query(db, "SELECT * FROM raw_instructions ORDER BY instruction_id")
    assert after["instruction_id"].n_unique() == after.height  # no batch twice
    assert sorted(set(after["prompt_index"])) == list(range(8))  # no batch missing
    assert set(after["run_id"]) == {plan_id}
    # Rows from before the kill are exactly as they were: not regenerated, not rewritten.
    kept_rows = after.filter(pl.col("instruction_id").is_in(before["instruction_id"].to_list()))
    assert kept_rows.equals(before)
    log = _plan_log(db, "raw_instructions")
    assert set(log["status"]) == {"finished"}
    assert log["batch_index"].to_list() == list(range(planned))
    by = log["committed_by_run_id"].to_list()
    assert by[:committed] == [plan_id] * committed and by[committed:] == [resumed.run_id] * (planned - committed)
    assert log["rows_written"].sum() == after.height
    # Every raw row decided exactly once; the decisions made before the kill stand unchanged.
    decided = _query(db, "SELECT * FROM deduplicated_instructions ORDER BY instruction_id")
    assert decided["instruction_id"].to_list() == after["instruction_id"].to_list()
    assert decided.filter(pl.col("instruction_id").is_in(before["instruction_id"].to_list())).equals(decided_before)
    # The plan's model queries are both runs': one generation per prompt, one label per kept instruction
    # (the killed batch's, never committed, were made again by the resuming run and counted there).
    [plan_queries] = _query(db, "SELECT llm_queries FROM generation_plans WHERE plan_id = ?", [plan_id])["llm_queries"]
    kept = decided.filter(pl.col("decision") == "kept").height
    assert json.loads(plan_queries) == {"generator": 8, "judge": kept}
    assert json.loads(metadata["plan_llm_queries"]) == json.loads(plan_queries)
    assert json.loads(metadata["llm_queries"])["generator"] == BATCH_SIZE * (planned - committed)  # this run's alone


INSTANCE_CONFIG = {"max_instructions": 4, "instances_per_instruction": 2, "max_new_tokens": 24}


@pytest.mark.parametrize("asset", ["instance_output_pairs", "selfinstruct_instance_pairs"])
def test_killed_instance_generation_run_is_finished_without_regenerating(
    upstream_of_instances, tiny_model_dir, asset, tmp_path
):
    data_dir = copy_data_dir(upstream_of_instances, tmp_path / "data")  # killed and resumed: plans and tables change
    db = data_dir / "refine_af.duckdb"
    staging = f"{asset}_batches"
    committed, planned = kill_mid_generation(data_dir, str(tiny_model_dir), asset, {asset: INSTANCE_CONFIG})
    assert planned >= 2 and 1 <= committed < planned, (committed, planned)
    before = _query(db, f"SELECT * FROM {staging} ORDER BY instance_id")
    [plan_id] = set(before["run_id"])
    assert before["instance_id"].n_unique() == before.height == BATCH_SIZE * committed
    # The asset's own table only ever holds a finished run: none yet.
    assert _query(db, f"SELECT count(*) AS n FROM {asset}") is None

    resumed = materialize(
        data_dir, str(tiny_model_dir), {asset: INSTANCE_CONFIG}, selection=[asset], batch_size=BATCH_SIZE
    )
    metadata = {k: v.value for k, v in resumed.asset_materializations_for_node(asset)[0].metadata.items()}
    assert metadata["resumed_plan"] is True and metadata["plan_run_id"] == plan_id
    assert metadata["batches_generated"] == planned - committed

    after = _query(db, f"SELECT * FROM {asset} ORDER BY instance_id")
    planned_ids = _query(
        db, "SELECT inputs FROM generation_plan_batches WHERE plan_id = ? AND asset = ?", [plan_id, asset]
    )["inputs"]
    expected_ids = sorted(item["instance_id"] for batch in planned_ids for item in json.loads(batch))
    assert after["instance_id"].to_list() == expected_ids  # every planned instance once: none missing, none twice
    assert set(after["run_id"]) == {plan_id} and after["keep"].dtype == pl.Boolean
    kept_rows = after.filter(pl.col("instance_id").is_in(before["instance_id"].to_list())).select(before.columns)
    assert kept_rows.equals(before)  # generated before the kill, published unchanged
    assert _query(db, f"SELECT count(*) AS n FROM {staging}")["n"][0] == 0
    log = _plan_log(db, asset)
    assert set(log["status"]) == {"finished"}
    by = log["committed_by_run_id"].to_list()
    assert sorted(by) == sorted([plan_id] * committed + [resumed.run_id] * (planned - committed))


RL_CONFIG = {"max_steps": 4, "checkpoint_every_steps": 1}


def test_killed_rl_training_resumes_from_its_checkpoint_in_the_next_run(
    upstream_of_instances, tiny_model_dir, tmp_path
):
    """A materialization of rl_refined_policy killed after its first checkpoint: the next run (a
    new run id) goes on from the checkpoint, says so in its metadata and log, takes only the
    remaining steps, and its table has every step once."""
    from refine_af_pipeline.training.checkpoints import Checkpoints

    data_dir = copy_data_dir(upstream_of_instances, tmp_path / "data")
    config = {"rl_refined_policy": RL_CONFIG}
    child = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            *("--data-dir", str(data_dir), "--model", str(tiny_model_dir), "--select", "rl_refined_policy"),
            *("--run-config", json.dumps(smallest_run_config(**config)), "--slow-train-step-seconds", "2"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    folders = data_dir / "artifacts" / "rl_refined_policy" / "checkpoints"
    try:
        deadline = time.monotonic() + 300
        while not any(Checkpoints(f, 1).latest_step() >= 1 for f in folders.glob("*")):
            assert child.poll() is None, child.communicate(timeout=30)[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the child ended on its own before the kill"
    [folder] = folders.glob("*")
    at_kill = Checkpoints(folder, 1).latest_step()
    assert 1 <= at_kill < RL_CONFIG["max_steps"]

    resumed = materialize(data_dir, str(tiny_model_dir), smallest_run_config(**config), selection=["rl_refined_policy"])
    [materialization] = resumed.asset_materializations_for_node("rl_refined_policy")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["resumed_from_step"] == at_kill
    assert metadata["steps_taken_this_run"] == RL_CONFIG["max_steps"] - at_kill
    with instance_for(data_dir) as instance:
        assert any(f"checkpoint of step {at_kill}" in (e.user_message or "") for e in instance.all_logs(resumed.run_id))
    table = _query(data_dir / "refine_af.duckdb", "SELECT step, run_id FROM rl_refined_policy ORDER BY step")
    assert table["step"].to_list() == list(range(1, RL_CONFIG["max_steps"] + 1))
    assert set(table["run_id"]) == {resumed.run_id}
    assert not folder.exists()  # the finished training removed its checkpoints
