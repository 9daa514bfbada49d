"""The data folder is the whole state: a copy of it (the DuckDB file and artifacts/) under a fresh,
empty Dagster instance re-runs the stages that read upstream artifacts (the held-out comparison,
an instance stage, the evaluation) and the query ledger, which reads every stage's query counts,
from the copy alone, with the original folder moved away."""

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
from pipeline_helpers import instance_for, materialize, smallest_run_config

from assets.query_ledger import LEDGER_STAGES
from refine_af_pipeline.definitions import all_assets
from refine_af_pipeline.evaluation.tasks import load_tasks
from refine_af_pipeline.training.splits import in_share
from resources import Warehouse

pytestmark = pytest.mark.slow  # minutes of tiny-model graph runs: out of make test-fast

EVALUATION = ["evaluation", "evaluation_predictions", "evaluation_summary"]
# Re-run on the copy: each reads an adapter (and the learned reward) that an upstream's table names.
RERUN = [*EVALUATION, "rl_heldout_comparison", "instance_output_pairs"]
TUNED = ["finetuned_model", "selfinstruct_finetuned_model", "bestofn_finetuned_model", "teams_finetuned_model"]
LEDGER = "llm_query_ledger"


def _upstream_of(targets: list[str]) -> list[str]:
    """Every asset the targets depend on, directly or not, with the other assets of each step it
    takes (a step that writes several assets is selected whole)."""
    deps = {s.key.to_user_string(): {d.asset_key.to_user_string() for d in s.deps} for a in all_assets for s in a.specs}
    steps = [{k.to_user_string() for k in a.keys} for a in all_assets if a.is_executable]
    found, todo = set(), [d for t in targets for d in deps[t]]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        todo += deps[name] | next((s for s in steps if name in s), set())
    return sorted(found)


def _table(data_dir: Path, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return conn.execute(sql).pl()


def _copy_data(source: Path, target: Path) -> Path:
    """The state a user copies: the DuckDB file and the artifacts, not the Dagster instance the
    tests keep in the same folder (pipeline_helpers.instance_for)."""
    target.mkdir(parents=True)
    shutil.copy2(source / "refine_af.duckdb", target / "refine_af.duckdb")
    shutil.copytree(source / "artifacts", target / "artifacts")
    return target


@pytest.fixture(scope="module")
def copied(tiny_model_dir, tmp_path_factory):
    """The upstream graph and the query ledger (so every stage it reads) materialized into one folder,
    copied, the original moved away; on the copy under a new, empty instance the ledger, then the
    stages of RERUN."""
    root = tmp_path_factory.mktemp("data-copy")
    original = root / "original"
    # instance_output_pairs too: the fine-tuned models' upstream; RERUN's stages: the ledger's.
    selection = [*_upstream_of([*RERUN, LEDGER]), LEDGER]
    # Fewer seed tasks for the learned reward than the other graph tests: it is the slowest step here.
    config = smallest_run_config(reward_model={"max_seed_tasks": 20})
    assert materialize(original, str(tiny_model_dir), config, selection=selection).success
    copy = _copy_data(original, root / "copy")
    stored = {t: _table(copy, f"SELECT DISTINCT adapter_path FROM {t}")["adapter_path"].to_list() for t in TUNED}
    moved = original.rename(root / "original-moved")  # whatever still reads the original fails
    with instance_for(copy) as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("finetuned_model")) is None
    ledger = materialize(copy, str(tiny_model_dir), smallest_run_config(), selection=[LEDGER])
    config = smallest_run_config(instance_output_pairs={"max_instructions": 3, "replicates": 1})
    result = materialize(copy, str(tiny_model_dir), config, selection=RERUN)
    return original, moved, copy, stored, result, ledger


def test_the_copy_reruns_the_downstream_stages_from_its_own_artifacts(copied):
    original, moved, copy, stored, result, _ = copied
    assert result.success
    assert not original.exists() and moved.exists()
    # The tables record the original folder's absolute paths; the copy found each below its own artifacts/.
    assert all(p.startswith(str(original / "artifacts")) for paths in stored.values() for p in paths)
    artifacts = (copy / "artifacts").resolve()
    scores = _table(copy, "SELECT * FROM evaluation")
    assert sorted(set(scores["model"])) == ["base", "best_of_n", "refine_af", "self_instruct", "teams_rl"]
    assert set(scores["run_id"]) == {result.run_id}
    assert scores.height == (1 + 2 * 4) * len(load_tasks())  # base once, four tuned models in two replicates
    tuned = scores.filter(pl.col("adapter_path").is_not_null())
    assert tuned.height == 8 * len(load_tasks())
    assert all(Path(p).is_relative_to(artifacts) and Path(p).is_dir() for p in tuned["adapter_path"])
    for table in TUNED:
        rows = _table(copy, f"SELECT DISTINCT replicate, adapter_path FROM {table}")
        for rep, path in rows.iter_rows():
            here = artifacts / Path(path).relative_to(original / "artifacts")
            assert here.is_dir()
            assert str(here) in set(tuned["adapter_path"]), (table, rep)
    heldout = _table(copy, "SELECT * FROM rl_heldout_comparison")
    assert heldout.height > 0 and set(heldout["run_id"]) == {result.run_id}
    pairs = _table(copy, "SELECT * FROM instance_output_pairs")
    assert pairs.height > 0 and set(pairs["run_id"]) == {result.run_id}
    for adapter in (*heldout["policy_adapter"], *pairs["policy_adapter"]):
        assert Path(adapter).is_relative_to(artifacts / "rl_refined_policy"), adapter
    # The held-out comparison used the share rl_refined_policy recorded in its table.
    [share] = _table(copy, "SELECT DISTINCT heldout_share FROM rl_refined_policy")["heldout_share"].to_list()
    kept = _table(copy, "SELECT instruction_id FROM deduplicated_instructions WHERE decision = 'kept'")
    assert set(heldout["instruction_id"]) == {i for i in kept["instruction_id"] if in_share(i, share)}


def test_a_missing_adapter_names_the_asset_the_run_and_the_path(copied, tiny_model_dir, tmp_path):
    original, _, copy, _, _, _ = copied
    bare = _copy_data(copy, tmp_path / "bare")
    logs = _table(bare, "SELECT DISTINCT run_id, replicate, adapter_path FROM selfinstruct_finetuned_model")
    run_id, _, path = logs.sort("replicate").row(0)
    gone = bare / "artifacts" / Path(path).relative_to(original / "artifacts")
    shutil.rmtree(gone)
    result = materialize(bare, str(tiny_model_dir), smallest_run_config(), selection=EVALUATION, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "selfinstruct_finetuned_model" in message and run_id in message and str(gone) in message


def test_the_copy_rebuilds_the_query_ledger_from_its_tables_alone(copied):
    _, moved, copy, _, _, ledger = copied
    assert ledger.success
    columns = ["stage", "branch", "purpose", "role", "queries", "source_run_id"]
    before = _table(moved, f"SELECT * FROM {LEDGER}").select(columns).sort(columns)
    after = _table(copy, f"SELECT * FROM {LEDGER}")
    assert set(after["run_id"]) == {ledger.run_id}
    # Under an instance that never saw a stage materialized: the same rows, from the tables and the plans.
    assert after.select(columns).sort(columns).equals(before)
    assert set(before["stage"]) == set(LEDGER_STAGES)
    counts = {(r["stage"], r["role"]): r["queries"] for r in before.iter_rows(named=True)}
    # raw_instructions' counts are its plan's: one query per prompt, one label per kept instruction.
    [plan] = _table(copy, "SELECT * FROM generation_plans WHERE asset = 'raw_instructions'").to_dicts()
    kept = _table(copy, "SELECT count(*) AS n FROM deduplicated_instructions WHERE decision = 'kept'")["n"][0]
    prompts = smallest_run_config()["bootstrap_instructions"]["num_prompts"]
    assert json.loads(plan["llm_queries"]) == {"generator": prompts, "judge": kept}
    assert (counts["raw_instructions", "generator"], counts["raw_instructions", "judge"]) == (prompts, kept)
    assert set(before.filter(pl.col("stage") == "raw_instructions")["source_run_id"]) == {plan["plan_id"]}


def test_a_stage_without_query_counts_fails_the_ledger_naming_it(copied, tiny_model_dir, tmp_path):
    _, _, copy, _, _, _ = copied
    bare = _copy_data(copy, tmp_path / "bare")
    with duckdb.connect(str(bare / "refine_af.duckdb")) as conn:  # as a version before the column wrote it
        conn.execute("ALTER TABLE teams_instruction_pairs DROP COLUMN llm_queries")
    [run_id] = _table(bare, "SELECT DISTINCT run_id FROM teams_instruction_pairs")["run_id"]
    result = materialize(bare, str(tiny_model_dir), smallest_run_config(), selection=[LEDGER], raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "teams_instruction_pairs" in message and run_id in message and "materialize it again" in message


def test_latest_run_rows_and_artifact_paths_in_a_moved_folder(tmp_path):
    wh = Warehouse(database=str(tmp_path / "w.duckdb"))
    assert wh.latest_run_rows("t") is None
    wh.write_table("t", pl.DataFrame({"run_id": ["a", "a"], "x": [1, 2]}))
    wh.write_table("t", pl.DataFrame({"run_id": ["b"], "x": [3]}), mode="append")
    wh.write_table("t", pl.DataFrame({"run_id": ["a"], "x": [4]}), mode="append")  # run a wrote last
    assert wh.latest_run_rows("t")["x"].to_list() == [1, 2, 4]
    assert wh.latest_run_rows("t", ["x"]).columns == ["run_id", "x"]
    wh.write_table("t", pl.DataFrame({"run_id": ["c"], "x": [5]}))
    assert wh.latest_run_rows("t")["x"].to_list() == [5]
    wh.write_table("empty", pl.DataFrame(schema={"run_id": pl.Utf8}))
    assert wh.latest_run_rows("empty").height == 0

    here = tmp_path / "artifacts" / "asset" / "run-1" / "adapter"
    here.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "asset" / "run-2" / "adapter"
    elsewhere.mkdir(parents=True)
    # A path recorded by another data folder: found in this one's artifacts/ when it is there.
    assert wh.artifact_path("/gone/data/artifacts/asset/run-1/adapter", "asset", "run-1") == here
    assert wh.artifact_path(str(here), "asset", "run-1") == here
    # Not in this folder: the stored path when it exists (an artifact store elsewhere), else where it would be here.
    assert wh.artifact_path(str(elsewhere), "asset", "run-2") == elsewhere
    assert wh.artifact_path("/gone/asset/run-3/x", "asset", "run-3") == tmp_path / "artifacts" / "asset" / "run-3" / "x"
    assert wh.artifact_path("artifacts/asset/run-1/adapter", "asset", "run-1") == here  # relative: to the data folder
