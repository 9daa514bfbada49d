"""Instruction pools: a new seed file (or model) starts its own pool, which the bootstrap grows and
de-duplicates alone and every downstream stage reads; naming an existing pool adds to it."""

import json
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
from pipeline_helpers import instance_for, materialize, smallest_run_config

from assets.shared import kept_instructions
from refine_af_pipeline.instructions.pools import (
    UNNAMED_POOL,
    PoolNameError,
    check_pool_name,
    derived_pool_name,
    generator_name,
    seed_set_digest,
)
from refine_af_pipeline.instructions.seeds import builtin_seed_path, load_seed_tasks
from resources import Warehouse

pytestmark = pytest.mark.graph  # unit tests of the names, and bootstrap runs on the tiny model

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ["seed_pool", "raw_instructions", "deduplicated_instructions", "instruction_pool"]


def _seed_file(path: Path, topic: str, n: int = 12) -> Path:
    lines = [
        {
            "id": f"{topic}_{k}",
            "name": f"{topic}_{k}",
            "instruction": f"Describe {topic} number {k} in one sentence for a curious reader.",
            "instances": [{"input": "", "output": f"{topic.capitalize()} {k} is described here briefly."}],
            "is_classification": k % 4 == 0,
        }
        for k in range(n)
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _table(data_dir: Path, sql: str):
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return conn.execute(sql).pl()


def _logged(data_dir: Path, result: dg.ExecuteInProcessResult, text: str) -> bool:
    """Whether the run's log (the step's context.log lines, kept by the data folder's instance) has `text`."""
    with instance_for(data_dir) as instance:
        return any(text in (entry.user_message or "") for entry in instance.all_logs(result.run_id))


def test_the_pool_is_named_by_the_seed_content_and_the_generator(tmp_path):
    builtin = load_seed_tasks()
    digest = seed_set_digest(builtin)
    assert digest == seed_set_digest(list(reversed(builtin)))  # order of the file does not matter
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_text(builtin_seed_path().read_text())
    assert seed_set_digest(load_seed_tasks(copy)) == digest  # the content names the seeds, not the path
    other = seed_set_digest(load_seed_tasks(_seed_file(tmp_path / "birds.jsonl", "bird")))
    assert other != digest
    assert (
        derived_pool_name("builtin", digest, "SmolLM2-135M-Instruct") == f"builtin-{digest[:8]}--SmolLM2-135M-Instruct"
    )
    assert derived_pool_name("/data/my seeds.v2.jsonl", other, "m").startswith("my-seeds.v2-")
    assert generator_name("embedded") == "SmolLM2-135M-Instruct"
    assert generator_name("mistralai/Mistral-7B-Instruct-v0.3") == "Mistral-7B-Instruct-v0.3"
    assert generator_name("/models/qwen 7b/") == "qwen-7b"
    assert generator_name("/models/x", served_model_name="fleet/llama-3-8b") == "llama-3-8b"


@pytest.mark.parametrize("name", ["", "a b", "-lead", "x" * 121, "p/q", "pool,2", "pool\n"])
def test_a_pool_name_outside_the_rule_is_refused_naming_it(name):
    with pytest.raises(PoolNameError, match="is not usable"):
        check_pool_name(name)


GRAPHQL_POOLS = """
{
  runTagsOrError(tagKeys: ["refine_af/pool"]) { ... on RunTags { tags { key values } } }
  assetOrError(assetKey: {path: ["instruction_pool"]}) {
    ... on Asset {
      assetMaterializations(limit: 1) {
        metadataEntries { label ... on TableMetadataEntry { table { records } } }
      }
    }
  }
}
"""


def _graphql_pools(data_dir: Path) -> tuple[list[str], list[str]]:
    """(the values of the runs' refine_af/pool tag, the latest instruction_pool materialization's
    `pools` records) as the webserver's GraphQL API answers them over the data folder's instance."""
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    with instance_for(data_dir) as instance:
        with define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context:
            result = execute_dagster_graphql(context, GRAPHQL_POOLS)
    assert not result.errors, result.errors
    [tag] = result.data["runTagsOrError"]["tags"]
    [materialization] = result.data["assetOrError"]["assetMaterializations"]
    [pools] = [e for e in materialization["metadataEntries"] if e["label"] == "pools"]
    return tag["values"], pools["table"]["records"]


def test_a_second_seed_file_starts_its_own_pool_and_naming_the_first_adds_to_it(tiny_model_dir, tmp_path):
    data_dir, model = tmp_path / "data", str(tiny_model_dir)
    first = materialize(data_dir, model, smallest_run_config(), selection=BOOTSTRAP)
    assert first.success
    pool_a = _table(data_dir, "SELECT DISTINCT pool FROM instruction_pool")["pool"].to_list()
    assert len(pool_a) == 1 and pool_a[0].startswith("builtin-") and pool_a[0].endswith(f"--{tiny_model_dir.name}")
    [pool_a] = pool_a
    kept_a = set(
        _table(data_dir, "SELECT instruction_id FROM deduplicated_instructions WHERE decision = 'kept'")[
            "instruction_id"
        ]
    )
    assert kept_a, "the tiny model kept nothing from the built-in seeds"

    birds = _seed_file(tmp_path / "birds.jsonl", "bird")
    second = materialize(
        data_dir,
        model,
        smallest_run_config(seed_pool={"seed_file": str(birds)}, bootstrap_instructions={"seed": 1}),
        selection=BOOTSTRAP,
    )
    assert second.success
    pool_b = _table(data_dir, f"SELECT pool FROM instruction_pool WHERE run_id = '{second.run_id}'")["pool"][0]
    assert pool_b.startswith("birds-") and pool_b != pool_a
    assert _logged(data_dir, second, f"instruction pool {pool_b!r}")
    with instance_for(data_dir) as instance:  # the runs of each pool are found by their tag in the UI
        assert instance.get_run_by_id(first.run_id).tags["refine_af/pool"] == pool_a
        assert instance.get_run_by_id(second.run_id).tags["refine_af/pool"] == pool_b
    # Everything the second run generated and decided is in pool B ...
    raw_b = _table(data_dir, f"SELECT * FROM raw_instructions WHERE run_id = '{second.run_id}'")
    assert raw_b.height and set(raw_b["pool"]) == {pool_b}
    decided_b = _table(data_dir, f"SELECT * FROM deduplicated_instructions WHERE run_id = '{second.run_id}'")
    assert set(decided_b["pool"]) == {pool_b}
    # ... its prompts showed no instruction of pool A, and nothing was de-duplicated against pool A.
    shown = {i for ids in raw_b["prompt_example_ids"] for i in json.loads(ids)}
    assert not shown & kept_a
    assert all(s.startswith("bird_") or s in set(decided_b["instruction_id"]) for s in shown)
    assert not set(decided_b["most_similar_instruction"].drop_nulls()) & set(
        _table(data_dir, f"SELECT instruction FROM deduplicated_instructions WHERE pool = '{pool_a}'")["instruction"]
    )
    # Downstream stages read pool B alone.
    warehouse = Warehouse(database=str(data_dir / "refine_af.duckdb"))
    kept_b = set(kept_instructions(warehouse)["instruction_id"])
    assert kept_b == set(decided_b.filter(decided_b["decision"] == "kept")["instruction_id"])
    assert not kept_b & kept_a

    # Naming pool A with the bird seeds adds to pool A on purpose.
    third = materialize(
        data_dir,
        model,
        smallest_run_config(seed_pool={"seed_file": str(birds)}, bootstrap_instructions={"seed": 2, "pool": pool_a}),
        selection=BOOTSTRAP,
    )
    assert third.success
    assert set(_table(data_dir, f"SELECT pool FROM raw_instructions WHERE run_id = '{third.run_id}'")["pool"]) == {
        pool_a
    }
    assert kept_a <= set(kept_instructions(warehouse)["instruction_id"])
    assert not kept_b & set(kept_instructions(warehouse)["instruction_id"])
    # The instruction_pool asset lists both pools, the latest first.
    [event] = [e for e in third.get_asset_materialization_events() if e.asset_key == dg.AssetKey("instruction_pool")]
    listed = event.materialization.metadata["pools"]
    assert [r.data["pool"] for r in listed.records] == [pool_a, pool_b]
    # And the UI's GraphQL API lists both: as the values of the runs' pool tag, and in that metadata.
    tags, latest = _graphql_pools(data_dir)
    assert set(tags) == {pool_a, pool_b}
    assert [json.loads(r)["pool"] for r in latest] == [pool_a, pool_b]


def test_rows_from_before_pools_were_named_are_the_unnamed_pool(tiny_model_dir, tmp_path):
    data_dir, model = tmp_path / "data", str(tiny_model_dir)
    assert materialize(data_dir, model, smallest_run_config(), selection=BOOTSTRAP).success
    with duckdb.connect(str(data_dir / "refine_af.duckdb")) as conn:  # a database from before pools
        for table in ("raw_instructions", "deduplicated_instructions"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN pool")
        kept = conn.execute("SELECT count(*) FROM deduplicated_instructions WHERE decision = 'kept'").fetchone()[0]
    # The derived pool is new, so it starts empty; naming 'unnamed' goes on with the old rows.
    named = smallest_run_config(bootstrap_instructions={"pool": UNNAMED_POOL, "target_pool_size": kept})
    result = materialize(data_dir, model, named, selection=BOOTSTRAP)
    assert result.success
    assert _logged(
        data_dir, result, f"instruction pool '{UNNAMED_POOL}' (named config): {kept} kept instructions so far"
    )
    warehouse = Warehouse(database=str(data_dir / "refine_af.duckdb"))
    assert kept_instructions(warehouse).height == kept


def test_a_stage_refuses_an_upstream_table_another_pool_made(tmp_path):
    from assets.shared import require_pool

    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    warehouse.write_table("reward_standardisation", pl.DataFrame({"bias": [0.0], "pool": ["a"], "run_id": ["r1"]}))
    require_pool(warehouse, "reward_standardisation", "a")
    with pytest.raises(
        dg.Failure, match="reward_standardisation was made from instruction pool 'a' and this run reads"
    ):
        require_pool(warehouse, "reward_standardisation", "b")
    warehouse.write_table("rl_refined_policy", pl.DataFrame({"step": [1], "run_id": ["r1"]}))  # before pools
    with pytest.raises(dg.Failure, match="made from instruction pool None"):
        require_pool(warehouse, "rl_refined_policy", "a")


def test_the_sft_draw_refuses_arms_from_two_pools(tmp_path):
    from assets.finetune import _kept_pairs_by_arm

    warehouse = Warehouse(database=str(tmp_path / "w.duckdb"))
    pair = {"instruction_id": ["i1"], "instruction": ["x"], "input": [""], "output": ["y"], "keep": [True]}
    for table, pool in [
        ("instance_output_pairs", "a"),
        ("selfinstruct_instance_pairs", "a"),
        ("bestofn_instance_pairs", "b"),
    ]:
        warehouse.write_table(table, pl.DataFrame({**pair, "instance_id": ["i1-0"], "reward": [0.5], "pool": [pool]}))
    with pytest.raises(dg.Failure, match="different instruction pools.*bestofn_instance_pairs: 'b'"):
        _kept_pairs_by_arm(warehouse)
