"""The whole graph on a tiny Llama the tests train themselves, into a temporary DuckDB."""

import json
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
from pipeline_helpers import STAGES_BEFORE_RL, copy_data_dir, materialize, smallest_run_config
from warehouse_recorder import lineage_violations, load_records

from assets.query_ledger import LEDGER_STAGES
from refine_af_pipeline.definitions import all_assets, all_checks
from refine_af_pipeline.evaluation.tasks import load_tasks
from refine_af_pipeline.exports import read_dataset_exports
from refine_af_pipeline.feedback.gates import DEFAULT_GATE_REWARD
from refine_af_pipeline.feedback.scores import COMPONENTS, PASSING_MARGIN
from refine_af_pipeline.instructions.rouge import RougeDeduplicator
from refine_af_pipeline.instructions.seeds import SeedFileError
from refine_af_pipeline.training.splits import in_share

pytestmark = pytest.mark.slow  # minutes of tiny-model graph runs: out of make test-fast

TABLES = [
    *STAGES_BEFORE_RL,
    "rl_refined_policy",
    "rl_heldout_comparison",
    "instance_output_pairs",
    "finetuned_model",
    "selfinstruct_instance_pairs",
    "selfinstruct_finetuned_model",
    "bestofn_instance_pairs",
    "bestofn_finetuned_model",
    "teams_operation_policy",
    "teams_policy_transitions",
    "teams_policy_comparison",
    "teams_evolved_instructions",
    "teams_instruction_pairs",
    "sft_training_pairs",
    "training_data_audit",
    "teams_finetuned_model",
    "evaluation",
    "evaluation_predictions",
    "evaluation_summary",
    "llm_query_ledger",
    "rl_verdict",
    "instruction_dataset_exports",
]
MODELS = ["base", "best_of_n", "refine_af", "self_instruct", "teams_rl"]
PAIRS = [
    ("refine_af", "self_instruct"),
    ("refine_af", "best_of_n"),
    ("refine_af", "base"),
    ("self_instruct", "base"),
    ("best_of_n", "base"),
    ("best_of_n", "self_instruct"),
    ("teams_rl", "base"),
    ("teams_rl", "self_instruct"),
    ("teams_rl", "refine_af"),
]


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    result = materialize(
        data_dir, str(tiny_model_dir), smallest_run_config(), record_file=data_dir / "tables_touched.jsonl"
    )
    return data_dir, result


BOOTSTRAP = ["raw_instructions", "deduplicated_instructions", "instruction_pool"]  # one step writes the three


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return event.materialization.metadata


def _table(data_dir: Path, sql: str):
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return conn.execute(sql).pl()


def test_every_stage_writes_its_table(first_run):
    data_dir, result = first_run
    assert result.success
    counts = {t: _table(data_dir, f"SELECT count(*) AS n FROM {t}")["n"][0] for t in TABLES}
    assert counts["seed_pool"] == 175
    assert all(n > 0 for n in counts.values()), counts
    assert counts["rl_refined_policy"] == 2  # one log row per RL step
    n_tasks = len(load_tasks())
    # (task, model, replicate) rows: the base model once, the four tuned models in both replicates
    assert counts["evaluation"] == (1 + 2 * (len(MODELS) - 1)) * n_tasks
    assert counts["evaluation_predictions"] == counts["evaluation"]  # one instance per task in the smallest config
    assert counts["evaluation_summary"] == 2 * len(PAIRS)  # (metric, every compared pair of the five models)


def test_every_table_a_step_touches_is_a_declared_edge(first_run):
    data_dir, result = first_run
    records = load_records(data_dir / "tables_touched.jsonl")
    assert lineage_violations(records, [*all_assets, *all_checks]) == []
    # The recorder saw the whole run: every asset step wrote its own tables, every check read its asset.
    written = {t for r in records if r["run_id"] == result.run_id for t in r["writes"]}
    assert written >= set(TABLES) | {"generation_plans", "generation_plan_batches"}, set(TABLES) - written
    checked = {c[1] for r in records if r["checks"] and r["reads"] for c in r["checks"]}
    assert checked >= {"no_kept_pair_above_rouge_threshold", "no_blacklisted_keyword", "instance_parse_rate"}


def test_every_column_has_a_description(first_run):
    from assets.columns import column_description, declared

    data_dir, result = first_run
    # Every stored table (the ledger's and the staging tables too) declares its columns, and each
    # column is described by that table's declaration or the shared one (assets/columns.py).
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        stored = conn.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall()
    assert {t for t, _ in stored} >= set(TABLES) | {"generation_plans", "generation_plan_batches"}
    assert not {t for t, _ in stored} - set(declared())
    assert not [(t, c) for t, c in stored if not column_description(t, c)]
    # Every materialization's column schema is its own table's, each column described; so is every
    # metadata table's.
    for materialization in result.get_asset_materialization_events():
        asset = materialization.asset_key.to_user_string()
        metadata = materialization.materialization.metadata
        columns = metadata["dagster/column_schema"].value.columns
        assert columns, asset
        undescribed = [c.name for c in columns if not c.description]
        assert not undescribed, (asset, undescribed)
        assert [c.description for c in columns] == [column_description(asset, c.name) for c in columns], asset
        for key, value in metadata.items():
            if isinstance(value, dg.TableMetadataValue):
                undescribed = [c.name for c in value.schema.columns if not c.description]
                assert not undescribed, (asset, key, undescribed)


def test_raw_instructions_carry_provenance(first_run, tiny_model_dir):
    data_dir, result = first_run
    raw = _table(data_dir, "SELECT * FROM raw_instructions")
    assert set(raw["run_id"]) == {result.run_id}
    assert set(raw["model_id"]) == {str(Path(tiny_model_dir).resolve())}
    assert raw["prompt_index"].n_unique() == 8
    for ids in raw["prompt_example_ids"]:
        assert len(json.loads(ids)) == 8
    params = json.loads(raw["sampling_params"][0])
    assert params["max_new_tokens"] == 64 and params["do_sample"] is True
    assert set(raw["parse_status"]) <= {"ok", "empty", "unparseable"}
    assert raw["instruction_id"].n_unique() == raw.height


def test_dedup_records_decisions_and_respects_threshold(first_run):
    data_dir, _ = first_run
    dedup = _table(data_dir, "SELECT * FROM deduplicated_instructions")
    raw = _table(data_dir, "SELECT instruction_id FROM raw_instructions")
    assert sorted(dedup["instruction_id"]) == sorted(raw["instruction_id"])  # every candidate decided
    kept = dedup.filter(dedup["decision"] == "kept")
    assert kept.height > 0
    assert (kept["max_rouge_l"] <= 0.7).all()
    assert kept["is_classification"].null_count() == 0
    rejected = dedup.filter(dedup["decision"] == "rejected")
    assert rejected["reason"].null_count() == 0


def test_reward_scores_have_components_and_scorers(first_run):
    data_dir, _ = first_run
    scores = _table(data_dir, "SELECT * FROM reward_scores")
    for column in ["preference", "naturalness", "coherence", "understandability", "reward", "gate_reason", "scorers"]:
        assert column in scores.columns
    passed = scores.filter(scores["gate_reason"].is_null())
    assert passed.height > 0
    assert ((passed["preference"] >= 0) & (passed["preference"] <= 1)).all()
    assert "preference" in json.loads(scores["scorers"][0])


def test_reward_standardisation_is_the_base_models_spread(first_run):
    data_dir, result = first_run
    [row] = _table(data_dir, "SELECT * FROM reward_standardisation").to_dicts()
    passed = _table(data_dir, "SELECT * FROM reward_scores WHERE gate_reason IS NULL")
    assert row["standardised_instances"] == passed.height > 0 and row["weights_source"] == "config"
    for c in COMPONENTS:
        assert row[f"mean_{c}"] == pytest.approx(passed[c].mean())
        spread = passed[c].std() if passed.height > 1 else 0.0
        assert row[f"std_{c}"] == pytest.approx(spread if spread > 1e-6 else 1.0)  # a constant adds nothing
    # The reward column is that standardisation applied: bias + sum of weight x z-score, floored just
    # above the gate's reward.
    expected = row["bias"] + sum(
        row[f"weight_{c}"] * (passed[c] - row[f"mean_{c}"]) / row[f"std_{c}"] for c in COMPONENTS
    )
    expected = expected.clip(lower_bound=DEFAULT_GATE_REWARD + PASSING_MARGIN)
    assert (expected - passed["reward"]).abs().max() < 1e-9
    metadata = result.asset_materializations_for_node("reward_scores")
    assert {m.asset_key.to_user_string() for m in metadata} == {"reward_scores", "reward_standardisation"}


def test_adapters_are_in_the_artifact_store(first_run):
    data_dir, result = first_run
    for table in ["rl_refined_policy", "finetuned_model", "selfinstruct_finetuned_model"]:
        path = Path(_table(data_dir, f"SELECT adapter_path FROM {table} LIMIT 1")["adapter_path"][0])
        assert path.is_relative_to(data_dir / "artifacts" / table / result.run_id)
        assert (path / "adapter_config.json").is_file()
        assert (path / "adapter_model.safetensors").is_file()
    pairs = _table(data_dir, "SELECT * FROM instance_output_pairs")
    assert pairs["policy_adapter"].str.contains("rl_refined_policy").all()


def test_rl_log_and_checks(first_run):
    data_dir, result = first_run
    log = _table(data_dir, "SELECT * FROM rl_refined_policy ORDER BY step")
    assert list(log["step"]) == [1, 2]
    for column in [
        "reward",
        "kl",
        "loss",
        "completion_length",
        "clipped_share",
        "gate_failure_share",
        "repeat_share",
        "preference_mean",
        "naturalness_mean",
        "coherence_mean",
        "understandability_mean",
    ]:
        assert column in log.columns
    metadata = result.asset_materializations_for_node("rl_refined_policy")[0].metadata
    for key in [
        "training_curves",
        "component_curves",
        "reward_hacking_curves",
        "reward_hacking_warnings",
        "final_reward",
        "final_repeat_share",
        "peak_rss_mib",
    ]:
        assert key in metadata, key
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["no_kept_pair_above_rouge_threshold"] and checks["no_blacklisted_keyword"]
    assert "policy_beats_base_on_heldout" in checks and "instance_parse_rate" in checks


def test_heldout_check_reports_paired_difference_ci_and_win_share(first_run):
    data_dir, result = first_run
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == "policy_beats_base_on_heldout"]
    assert evaluation.severity == dg.AssetCheckSeverity.WARN and evaluation.asset_key == dg.AssetKey(
        "rl_heldout_comparison"
    )
    m = {k: v.value for k, v in evaluation.metadata.items()}
    table = _table(data_dir, "SELECT * FROM rl_heldout_comparison")
    assert m["heldout_instructions"] == table.height > 0
    assert m["ci95_low"] <= m["mean_difference"] <= m["ci95_high"]
    assert evaluation.passed == (m["ci95_low"] > 0 and table.height >= 5)  # min_instructions' default: 5
    assert m["answer"] in evaluation.description and f"n = {table.height} instructions" in evaluation.description
    assert m["mean_difference"] == pytest.approx(m["mean_reward_policy"] - m["mean_reward_base"])
    assert m["mean_difference"] == pytest.approx(table["reward_difference"].mean())
    assert 0.0 <= m["win_share"] <= 1.0
    assert m["win_share"] == pytest.approx((table["outcome"] == "win").mean())
    assert m["win_share"] + m["tie_share"] + m["loss_share"] == pytest.approx(1.0)
    assert all(f"difference_{c}" in m for c in ["preference", "naturalness", "coherence", "understandability"])
    assert evaluation.passed == (m["ci95_low"] > 0 and m["heldout_instructions"] >= 5)
    # The check compares on instructions RL never trained on: the same hash split the asset used,
    # at the share it recorded (raised from 20% so that a small pool holds out min(6, half) of it).
    kept = _table(
        data_dir,
        f"SELECT instruction_id FROM deduplicated_instructions WHERE decision = 'kept' AND run_id = '{result.run_id}'",
    )
    share = _table(data_dir, "SELECT DISTINCT heldout_share FROM rl_refined_policy")["heldout_share"].to_list()
    assert len(share) == 1
    heldout = {i for i in kept["instruction_id"] if in_share(i, share[0])}
    assert set(table["instruction_id"]) == heldout and len(heldout) >= min(6, kept.height // 2)
    rl_metadata = result.asset_materializations_for_node("rl_refined_policy")[0].metadata
    assert rl_metadata["heldout_instructions"].value == len(heldout)
    assert (table["samples"] == 2).all()


def test_second_run_grows_the_pool_without_near_duplicates(first_run, tiny_model_dir, tmp_path):
    data_dir = copy_data_dir(first_run[0], tmp_path / "data")  # this test and the next three write into it
    before = _table(data_dir, "SELECT count(*) AS n FROM raw_instructions")["n"][0]
    result = materialize(
        data_dir,
        str(tiny_model_dir),
        smallest_run_config(bootstrap_instructions={"seed": 1}),
        selection=["raw_instructions", "deduplicated_instructions", "instruction_pool"],
    )
    assert result.success
    raw = _table(data_dir, "SELECT * FROM raw_instructions")
    assert raw.height > before and raw["run_id"].n_unique() == 2
    dedup = _table(data_dir, "SELECT * FROM deduplicated_instructions")
    kept_first = dedup.filter((dedup["decision"] == "kept") & (dedup["run_id"] != result.run_id))["instruction"]
    kept_second = dedup.filter((dedup["decision"] == "kept") & (dedup["run_id"] == result.run_id))["instruction"]
    pool = RougeDeduplicator(kept_first.to_list())
    assert all(pool.max_score(i)[0] <= 0.7 for i in kept_second)


def test_bad_seed_file_fails_with_its_name_and_keeps_the_table(first_run, tiny_model_dir, tmp_path):
    data_dir = copy_data_dir(first_run[0], tmp_path / "data")
    bad = tmp_path / "bad_seeds.jsonl"
    bad.write_text('{"id": "a", "instruction": "Do the thing", "instances": [{"input": "", "output": "x"}]}\n{oops\n')
    with pytest.raises(SeedFileError, match=r"bad_seeds.jsonl:2: malformed JSON"):
        materialize(
            data_dir,
            str(tiny_model_dir),
            smallest_run_config(seed_pool={"seed_file": str(bad)}),
            selection=["seed_pool"],
        )
    assert _table(data_dir, "SELECT count(*) AS n FROM seed_pool")["n"][0] == 175


def test_reaching_the_target_pool_size_stops_generation(first_run, tiny_model_dir, tmp_path):
    data_dir = copy_data_dir(first_run[0], tmp_path / "data")
    before = _table(data_dir, "SELECT count(*) AS n FROM raw_instructions")["n"][0]
    result = materialize(
        data_dir,
        str(tiny_model_dir),
        smallest_run_config(bootstrap_instructions={"target_pool_size": 1}),
        selection=BOOTSTRAP,
    )
    assert result.success
    assert _table(data_dir, "SELECT count(*) AS n FROM raw_instructions")["n"][0] == before
    metadata = _metadata(result, "raw_instructions")
    assert metadata["dagster/row_count"].value == before and metadata["rows_this_run"].value == 0
    # A run with nothing to do made no queries: the ledger says zeros for it, not the run before's counts.
    assert materialize(data_dir, str(tiny_model_dir), {}, selection=["llm_query_ledger"]).success
    rows = _table(data_dir, "SELECT * FROM llm_query_ledger WHERE stage = 'raw_instructions'")
    assert dict(zip(rows["role"], rows["queries"])) == {"generator": 0, "judge": 0}
    assert set(rows["source_run_id"]) == {result.run_id}


def test_generation_stops_within_a_run_once_the_target_is_reached(first_run, tiny_model_dir, tmp_path):
    data_dir = copy_data_dir(first_run[0], tmp_path / "data")
    kept = _table(data_dir, "SELECT count(*) AS n FROM deduplicated_instructions WHERE decision = 'kept'")["n"][0]
    result = materialize(
        data_dir,
        str(tiny_model_dir),
        smallest_run_config(bootstrap_instructions={"target_pool_size": int(kept) + 1, "seed": 2}),
        selection=BOOTSTRAP,
        batch_size=2,
    )
    assert result.success
    rows = _table(
        data_dir,
        f"SELECT r.prompt_index, d.decision FROM raw_instructions r JOIN deduplicated_instructions d "
        f"USING (instruction_id) WHERE r.run_id = '{result.run_id}'",
    )
    # Batches of 2 prompts, each decided as it is generated: generation stops after the first batch
    # that kept an instruction.
    batches_with_kept = sorted({i // 2 for i, d in rows.iter_rows() if d == "kept"})
    assert batches_with_kept, "the tiny model kept nothing"
    assert rows["prompt_index"].n_unique() == 2 * (batches_with_kept[0] + 1) < 8
    assert _metadata(result, "raw_instructions")["prompts_used"].value == rows["prompt_index"].n_unique()
    assert _metadata(result, "deduplicated_instructions")["kept_total"].value >= kept + 1


def test_self_instruct_branch_uses_the_base_model_on_the_same_instructions(first_run, tiny_model_dir):
    data_dir, result = first_run
    refine = _table(data_dir, "SELECT * FROM instance_output_pairs ORDER BY instance_id")
    baseline = _table(data_dir, "SELECT * FROM selfinstruct_instance_pairs ORDER BY instance_id")
    assert baseline["instruction_id"].to_list() == refine["instruction_id"].to_list()
    assert baseline["policy_adapter"].null_count() == baseline.height  # no RL adapter: the base model wrote them
    assert set(baseline["model_id"]) == set(refine["model_id"]) == {str(Path(tiny_model_dir).resolve())}
    assert set(baseline["run_id"]) == {result.run_id}
    for column in ["sampling_params", "scorers", "preference_scorer"]:
        assert set(baseline[column]) == set(refine[column]), column
    assert set(baseline.columns) == set(refine.columns)
    logs = {
        t: _table(data_dir, f"SELECT DISTINCT settings, train_table FROM {t}")
        for t in ["finetuned_model", "selfinstruct_finetuned_model"]
    }
    assert sorted(logs["finetuned_model"]["settings"]) == sorted(logs["selfinstruct_finetuned_model"]["settings"])
    assert set(logs["selfinstruct_finetuned_model"]["train_table"]) == {"selfinstruct_instance_pairs"}


def test_evaluation_compares_five_models_on_both_metrics_with_a_summary_and_a_warning_check(first_run):
    data_dir, result = first_run
    n_tasks = len(load_tasks())
    scores = _table(data_dir, "SELECT * FROM evaluation")
    assert sorted(set(scores["model"])) == MODELS
    assert scores.group_by("model").len().sort("model")["len"].to_list() == [
        n_tasks if m == "base" else 2 * n_tasks for m in MODELS
    ]
    assert (scores["log_likelihood"] < 0).all()  # mean log-probability per token of a reference
    adapters = {
        (m, r): a
        for m, r, a in _table(data_dir, "SELECT DISTINCT model, replicate, adapter_path FROM evaluation").iter_rows()
    }
    assert adapters[("base", 0)] is None
    assert "/selfinstruct_finetuned_model/" in adapters[("self_instruct", 0)]
    assert "/finetuned_model/" in adapters[("refine_af", 0)] and "/replicate-1/" in adapters[("refine_af", 1)]
    predictions = _table(data_dir, "SELECT * FROM evaluation_predictions")
    per_task = predictions.group_by("task", "model", "replicate").agg(
        pl.col("rouge_l").mean(), pl.col("reference_log_likelihood").mean()
    )
    joined = per_task.join(scores, on=["task", "model", "replicate"])
    assert joined.height == scores.height and (joined["rouge_l"] - joined["rouge_l_right"]).abs().max() < 1e-12
    assert (joined["reference_log_likelihood"] - joined["log_likelihood"]).abs().max() < 1e-9
    # The summary compares each model's task means averaged over its replicates.
    scores = scores.group_by("task", "model").agg(pl.col("rouge_l").mean(), pl.col("log_likelihood").mean())
    # The tuned adapters change the model: its log-likelihood of the references moves on nearly
    # every task (a task mean can stay put by chance when tokens move both ways: 1 of 64 once).
    wide_ll = scores.pivot(on="model", index="task", values="log_likelihood")
    assert ((wide_ll["refine_af"] - wide_ll["base"]).abs() > 1e-4).mean() >= 0.9
    summary = _table(data_dir, "SELECT * FROM evaluation_summary")
    assert sorted(set(summary["metric"])) == ["log_likelihood", "rouge_l"]
    for metric in ("rouge_l", "log_likelihood"):
        wide = scores.pivot(on="model", index="task", values=metric)
        for candidate, reference in PAIRS:
            row = summary.filter(
                (pl.col("metric") == metric) & (pl.col("candidate") == candidate) & (pl.col("reference") == reference)
            ).row(0, named=True)
            diff = wide[candidate] - wide[reference]
            tolerance = 1e-9 if metric == "rouge_l" else 1e-4
            assert row["n_tasks"] == n_tasks
            assert row["wins"] == int((diff > tolerance).sum()) and row["ties"] == int((diff.abs() <= tolerance).sum())
            assert row["wins"] + row["ties"] + row["losses"] == n_tasks
            assert row["win_share_ci_low"] <= row["win_share"] <= row["win_share_ci_high"]
            assert row["mean_difference"] == pytest.approx(diff.mean())
    metadata = _metadata(result, "evaluation")
    for key in [
        "mean_rouge_l_base",
        "mean_rouge_l_self_instruct",
        "mean_rouge_l_refine_af",
        "mean_log_likelihood_base",
        "mean_log_likelihood_refine_af",
        "summary",
        "per_task",
        "chart",
        "share_tasks_refine_af_beats_self_instruct",
        "share_ci95_low",
        "share_ci95_high",
        "ties",
        "tasks_log_likelihood_differs_from_base_refine_af",
        "peak_rss_mib",
    ]:
        assert key in metadata, key
    assert metadata["mean_rouge_l_refine_af"].value == pytest.approx(
        scores.filter(pl.col("model") == "refine_af")["rouge_l"].mean()
    )
    assert metadata["tasks_log_likelihood_differs_from_base_refine_af"].value == int(
        ((wide_ll["refine_af"] - wide_ll["base"]).abs() > 0.01).sum()
    )
    headline = summary.filter(
        (pl.col("metric") == "rouge_l")
        & (pl.col("candidate") == "refine_af")
        & (pl.col("reference") == "self_instruct")
    ).row(0, named=True)
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "refine_af_beats_self_instruct"]
    assert check.severity == dg.AssetCheckSeverity.WARN
    # The CI decides, not wins against losses: pass only when its low end is above 0.
    assert check.passed == (headline["mean_difference_ci_low"] > 0)
    assert f"n = {headline['n_tasks']} tasks" in check.description
    if headline["mean_difference_ci_low"] <= 0 < headline["mean_difference_ci_high"]:
        assert "cannot tell" in check.description and check.metadata["answer"].value == "cannot tell"


def test_every_arm_fine_tunes_on_an_equal_draw(first_run):
    data_dir, result = first_run
    drawn = _table(
        data_dir,
        "SELECT branch, slice, count(*) AS n FROM sft_training_pairs WHERE replicate = 0 GROUP BY branch, slice",
    )
    for part in ("train", "validation"):
        counts = drawn.filter(pl.col("slice") == part)["n"].to_list()
        [target] = {
            m.metadata[f"{part}_pairs_per_arm"].value
            for m in result.asset_materializations_for_node("sft_training_pairs")
        }
        [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "every_arm_has_its_pairs"]
        # Equal sizes, or the check says which arm fell short.
        assert all(n == target for n in counts) or not check.passed
    train = _table(
        data_dir, "SELECT branch, instruction_id FROM sft_training_pairs WHERE slice = 'train' AND replicate = 0"
    )
    by_arm = {a: set(train.filter(pl.col("branch") == a)["instruction_id"]) for a in ("refine_af", "self_instruct")}
    # Every arm on the shared pool: the draw puts first the instructions all of them kept.
    kept = [
        set(_table(data_dir, f"SELECT instruction_id FROM {t} WHERE keep AND replicate = 0")["instruction_id"])
        for t in ("instance_output_pairs", "selfinstruct_instance_pairs", "bestofn_instance_pairs")
    ]
    held = set(
        _table(data_dir, "SELECT instruction_id FROM sft_training_pairs WHERE slice = 'validation' AND replicate = 0")[
            "instruction_id"
        ]
    )
    # Instructions both branches kept (outside validation) come first: the overlap is as large as the draw allows.
    common = (kept[0] & kept[1] & kept[2]) - held
    assert len(by_arm["refine_af"] & by_arm["self_instruct"]) >= min(len(by_arm["refine_af"]), len(common))


def test_sft_logs_train_and_validation_loss_per_epoch(first_run):
    data_dir, result = first_run
    for table, pairs_table in [
        ("finetuned_model", "instance_output_pairs"),
        ("selfinstruct_finetuned_model", "selfinstruct_instance_pairs"),
    ]:
        log = _table(data_dir, f"SELECT * FROM {table} WHERE replicate = 0 ORDER BY epoch")
        assert _table(data_dir, f"SELECT DISTINCT replicate FROM {table} ORDER BY 1")["replicate"].to_list() == [0, 1]
        assert log["epoch"].to_list() == [0, 1, 2]
        assert log["steps"][0] == 0 and log["steps"].is_sorted() and log["steps"][-1] > 0
        assert log["validation_loss"].is_not_nan().all() and log["train_loss"].is_not_nan().all()
        kept = _table(data_dir, f"SELECT count(*) AS n FROM {pairs_table} WHERE keep AND replicate = 0")["n"][0]
        drawn = _table(
            data_dir,
            f"SELECT slice, count(*) AS n FROM sft_training_pairs WHERE source_table = '{pairs_table}' "
            "AND replicate = 0 GROUP BY slice ORDER BY slice",
        )
        assert drawn["slice"].to_list() == ["train", "validation"]
        assert (log["train_examples"][0], log["validation_examples"][0]) == tuple(drawn["n"].to_list())
        assert log["train_examples"][0] + log["validation_examples"][0] <= kept
        assert log["validation_examples"][0] >= 1
        metadata = result.asset_materializations_for_node(table)[0].metadata
        for key in [
            "loss_curve",
            "final_train_loss",
            "final_validation_loss",
            "first_validation_loss",
            "validation_warning",
            "optimizer_steps",
            "peak_rss_mib",
        ]:
            assert key in metadata, key
        assert metadata["final_validation_loss"].value == pytest.approx(log["validation_loss"][-1])


def test_exports_hold_the_kept_pairs_of_every_branch_in_every_format(first_run):
    data_dir, result = first_run
    listing = _table(data_dir, "SELECT * FROM instruction_dataset_exports")
    assert sorted(set(listing["dataset"])) == ["refine_af", "self_instruct", "teams_rl"]
    assert listing.height == 3 * 4
    for dataset, table in [
        ("refine_af", "instance_output_pairs"),
        ("self_instruct", "selfinstruct_instance_pairs"),
        ("teams_rl", "teams_instruction_pairs"),
    ]:
        # The first replicate: one dataset per branch.
        first = " AND coalesce(replicate, 0) = 0" if table != "teams_instruction_pairs" else ""
        kept = _table(data_dir, f"SELECT * FROM {table} WHERE keep{first} ORDER BY instance_id")
        folder = data_dir / "artifacts" / "instruction_dataset_exports" / result.run_id / dataset
        assert set(listing.filter(pl.col("dataset") == dataset)["rows"]) == {kept.height}
        for fmt, records in read_dataset_exports(folder).items():
            assert [r["instance_id"] for r in records] == kept["instance_id"].to_list(), fmt
            assert [r["output"] for r in records] == kept["output"].to_list(), fmt
            if "policy_adapter" in kept.columns:
                assert [r["policy_adapter"] for r in records] == kept["policy_adapter"].to_list(), fmt
            assert {r["run_id"] for r in records} <= {result.run_id}, fmt


def test_teams_branch_trains_compares_evolves_answers_and_fine_tunes(first_run, tiny_model_dir):
    data_dir, result = first_run
    log = _table(data_dir, "SELECT * FROM teams_operation_policy ORDER BY update")
    settings = json.loads(_metadata(result, "teams_operation_policy")["settings"].value)
    assert log["update"].to_list() == list(range(1, settings["updates"] + 1))
    shares = log.select([c for c in log.columns if c.startswith("share_")])
    assert [round(sum(r), 9) for r in shares.iter_rows()] == [1.0] * log.height  # action shares per rollout
    assert ((log["entropy"] > 0) & (log["kl"] >= 0)).all()
    policy_file = Path(log["policy_path"][0])
    assert policy_file.is_file() and f"/teams_operation_policy/{result.run_id}/" in str(policy_file)
    transitions = _table(data_dir, "SELECT * FROM teams_policy_transitions")
    assert transitions.height == settings["updates"] * settings["episodes_per_update"] * settings["horizon"]
    # Every intermediate instruction is kept: each step rewrites what the step before left.
    assert sorted(set(transitions["step"])) == list(range(1, settings["horizon"] + 1))
    assert ((transitions["reward"] == 0) | transitions["rule"].is_null()).all()
    assert (transitions.filter(pl.col("rule").is_not_null())["reward"] == 0).all()
    held = {
        i
        for i in _table(data_dir, "SELECT id FROM seed_pool")["id"]
        if in_share(i, settings["heldout_share"], "teams-heldout")
    }
    assert not held & set(transitions["seed_id"])  # training never saw a held-out seed task
    assert set(transitions["model_id"]) == {str(tiny_model_dir)}
    assert all(v.startswith("teams-information-gain/v1:") for v in transitions["reviewer_version"])

    comparison = _table(data_dir, "SELECT * FROM teams_policy_comparison")
    arms = sorted(set(comparison["arm"]))
    assert arms[:2] == ["fixed:" + arms[0].split(":")[1], "policy"] and "uniform" in arms
    assert set(comparison["seed_id"]) <= held and len(set(comparison["seed_id"])) >= 2
    per_seed = (
        comparison.group_by("arm", "seed_id")
        .agg(pl.col("reward").mean())
        .pivot(on="arm", index="seed_id", values="reward")
    )
    metadata = _metadata(result, "teams_policy_comparison")
    assert metadata["policy_minus_uniform"].value == pytest.approx((per_seed["policy"] - per_seed["uniform"]).mean())
    assert (
        metadata["policy_minus_uniform_ci95_low"].value
        <= metadata["policy_minus_uniform"].value
        <= metadata["policy_minus_uniform_ci95_high"].value
    )
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "teams_policy_beats_uniform"]
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.passed == (metadata["policy_minus_uniform_ci95_low"].value > 0)
    if metadata["policy_minus_uniform_ci95_low"].value <= 0 < metadata["policy_minus_uniform_ci95_high"].value:
        assert "cannot tell" in check.description

    evolved = _table(data_dir, "SELECT * FROM teams_evolved_instructions")
    assert evolved["keep"].sum() > 0
    assert evolved.filter(pl.col("keep"))["filter_reason"].is_null().all()
    assert evolved.filter(~pl.col("keep"))["filter_reason"].is_not_null().all()
    kept = evolved.filter(pl.col("keep"))["instruction"].to_list()
    assert all(d.keep for d in RougeDeduplicator([], threshold=0.7).consider_many(kept))  # no near duplicates kept
    pairs = _table(data_dir, "SELECT * FROM teams_instruction_pairs")
    assert set(pairs["instruction_id"]) == set(evolved.filter(pl.col("keep"))["instruction_id"])
    assert (pairs.filter(pl.col("keep"))["output"].str.strip_chars() != "").all()
    assert set(pairs["model_id"]) == {str(tiny_model_dir)} and set(pairs["backend"]) == {"transformers"}
    sft = _table(data_dir, "SELECT DISTINCT settings, train_table FROM teams_finetuned_model")
    assert set(sft["train_table"]) == {"teams_instruction_pairs"}
    # Each replicate's trainer seed differs; the settings per replicate are every branch's.
    assert sorted(sft["settings"]) == sorted(
        _table(data_dir, "SELECT DISTINCT settings FROM finetuned_model")["settings"]
    )
    for key in ("headroom", "headroom_uniform", "headroom_best_fixed", "headroom_best_per_state", "headroom_by_state"):
        assert key in metadata, key
    # NaN when no (state, operation) cell had 3 transitions, as can happen at the tiny sizes.
    assert metadata["headroom"].value == pytest.approx(
        metadata["headroom_best_per_state"].value - metadata["headroom_uniform"].value, nan_ok=True
    )


def test_query_ledger_counts_every_stages_queries_by_role(first_run):
    data_dir, result = first_run
    ledger = _table(data_dir, "SELECT * FROM llm_query_ledger")
    counts = {(r["stage"], r["role"]): r["queries"] for r in ledger.iter_rows(named=True)}
    transitions = _table(data_dir, "SELECT * FROM teams_policy_transitions")
    # Rewrites the cache did not serve (one per distinct prompt of a step), and judgements the
    # cache did not serve of rewrites no rule zeroed.
    fresh = transitions.filter(~pl.col("rewrite_cached")).select("update", "step", "before", "operation").unique()
    assert counts[("teams_operation_policy", "rewriter")] == fresh.height > 0
    assert counts[("teams_operation_policy", "reviewer")] == int(
        ((~transitions["review_cached"]) & transitions["rule"].is_null()).sum()
    )
    pairs = _table(data_dir, "SELECT count(*) AS n FROM teams_instruction_pairs")["n"][0]
    assert counts[("teams_instruction_pairs", "expert")] == pairs
    n_eval = _table(data_dir, "SELECT count(*) AS n FROM evaluation_predictions")["n"][0]
    assert counts[("evaluation", "evaluated")] == n_eval
    rl_steps = _table(data_dir, "SELECT count(*) AS n FROM rl_refined_policy")["n"][0]
    ops = smallest_run_config()["rl_refined_policy"]
    assert counts[("rl_refined_policy", "generator")] == rl_steps * ops["prompts_per_step"] * ops["group_size"]
    assert counts[("reward_scores", "generator")] == _table(data_dir, "SELECT count(*) AS n FROM reward_scores")["n"][0]
    # Every stage's counts come from the data folder: its table's llm_queries column (the rows of its
    # latest run), the bootstrap's from its generation plan (one query per prompt, one label per kept one).
    for stage in set(LEDGER_STAGES) - {"raw_instructions"}:
        [recorded] = _table(data_dir, f"SELECT DISTINCT llm_queries FROM {stage}")["llm_queries"]
        assert {r: n for (s, r), n in counts.items() if s == stage} == json.loads(recorded), stage
    kept = _table(data_dir, "SELECT count(*) AS n FROM deduplicated_instructions WHERE decision = 'kept'")["n"][0]
    prompts = smallest_run_config()["bootstrap_instructions"]["num_prompts"]
    assert (counts[("raw_instructions", "generator")], counts[("raw_instructions", "judge")]) == (prompts, kept)
    assert set(ledger.filter(pl.col("stage") == "raw_instructions")["source_run_id"]) == {result.run_id}
    assert set(ledger["branch"]) >= {
        "self_instruct+refine_af+best_of_n",
        "refine_af",
        "self_instruct",
        "best_of_n",
        "teams_rl",
        "evaluation",
    }
    metadata = _metadata(result, "llm_query_ledger")
    expert = sum(n for (a, role), n in counts.items() if role == "expert" and a.startswith("teams_"))
    teams_data = sum(
        r["queries"] for r in ledger.iter_rows(named=True) if r["branch"] == "teams_rl" and r["purpose"] == "data"
    )
    assert metadata["teams_rl_expert_queries"].value == expert
    assert metadata["teams_rl_expert_share_of_its_queries"].value == pytest.approx(expert / teams_data)


def test_verdict_answers_every_question_from_the_graphs_comparisons(first_run):
    data_dir, result = first_run
    verdict = _table(data_dir, "SELECT * FROM rl_verdict")
    # a by the audit and by the training reward; b and c on two evaluation metrics and the audit of
    # their training pairs; d against uniform and the best fixed operation.
    assert verdict["metric"].to_list().count("training reward") == 1 and verdict.height >= 7
    assert set(verdict["answer"]) <= {"yes", "no", "cannot tell"}
    assert (verdict["ci95_low"] <= verdict["effect"]).all() and (verdict["effect"] <= verdict["ci95_high"]).all()
    # Row b on ROUGE-L is the mean over tasks of REFINE-AF minus Self-Instruct in the evaluation table.
    scores = _table(
        data_dir, "SELECT task, model, replicate, rouge_l FROM evaluation WHERE model IN ('refine_af', 'self_instruct')"
    )
    wide = scores.pivot(on="model", index=["task", "replicate"], values="rouge_l")
    row = verdict.filter(pl.col("question").str.starts_with("b.") & (pl.col("metric") == "rouge_l")).row(0, named=True)
    # The mean over (replicate, task) cells of REFINE-AF minus Self-Instruct; both replicates count.
    assert row["effect"] == pytest.approx((wide["refine_af"] - wide["self_instruct"]).mean())
    assert row["n_items"] == wide["task"].n_unique() and row["n_seeds"] == 2
    heldout = _table(data_dir, "SELECT reward_difference FROM rl_heldout_comparison")
    row_a = verdict.filter(pl.col("question").str.starts_with("a.") & (pl.col("metric") == "training reward")).row(
        0, named=True
    )
    assert row_a["effect"] == pytest.approx(heldout["reward_difference"].mean())
    audit = _table(data_dir, "SELECT audit_difference FROM rl_heldout_comparison WHERE audit_difference IS NOT NULL")
    audit_rows = verdict.filter(pl.col("question").str.starts_with("a.") & pl.col("metric").str.starts_with("audit"))
    assert audit_rows.height == (1 if audit.height else 0)
    if audit.height:
        assert audit_rows["effect"][0] == pytest.approx(audit["audit_difference"].mean())
