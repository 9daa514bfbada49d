"""The stages after TeaMs-RL's instructor read what it trained (policy file, settings, reviewer) from
its table: a copy of the data folder under a fresh DAGSTER_HOME materializes them, and a reviewer,
transitions or table that do not belong to the trained policy fail the step naming both sides."""

import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from pipeline_helpers import instance_for, materialize, smallest_run_config

from resources import LanguageModelResource

pytestmark = pytest.mark.graph

POLICY = ["teams_operation_policy", "teams_policy_transitions"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A data folder holding the seed pool and a trained instructor (never changed by the tests)."""
    data_dir = tmp_path_factory.mktemp("teams-data")
    materialize(data_dir, str(tiny_model_dir), smallest_run_config(), selection=["seed_pool"])
    materialize(data_dir, str(tiny_model_dir), smallest_run_config(), selection=POLICY)
    return data_dir


def _copy(data_dir: Path, to: Path) -> Path:
    """The data folder copied without its Dagster instance: the copy starts a fresh DAGSTER_HOME."""
    shutil.copytree(data_dir, to, ignore=shutil.ignore_patterns("dagster_home"))
    return to


def _sql(data_dir: Path, sql: str, read_only: bool = True):
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=read_only) as conn:
        result = conn.execute(sql)
        return result.pl() if read_only else None


def test_a_copied_data_folder_under_a_fresh_dagster_home_materializes_every_downstream(
    trained, tiny_model_dir, tmp_path
):
    copy = _copy(trained, tmp_path / "copy")
    result = materialize(
        copy,
        str(tiny_model_dir),
        smallest_run_config(),
        selection=["teams_policy_comparison", "teams_evolved_instructions", "teams_instruction_pairs"],
    )
    assert result.success
    with instance_for(copy) as instance:  # the instance knows only this run: nothing came from an event log
        assert instance.get_latest_materialization_event(dg.AssetKey("teams_operation_policy")) is None
    [run_id] = _sql(copy, "SELECT DISTINCT run_id FROM teams_operation_policy")["run_id"]
    policy_file = copy / "artifacts" / "teams_operation_policy" / run_id / "instructor_trpo.zip"
    for table in ("teams_policy_comparison", "teams_evolved_instructions"):
        # The copy's own policy file, not the original folder's.
        assert _sql(copy, f"SELECT DISTINCT policy_path FROM {table}")["policy_path"].to_list() == [str(policy_file)]
    held = _sql(copy, "SELECT DISTINCT seed_id FROM teams_policy_comparison")["seed_id"].to_list()
    assert len(held) == smallest_run_config()["teams_policy_comparison"]["max_seeds"]
    assert _sql(copy, "SELECT count(*) AS n FROM teams_instruction_pairs")["n"][0] > 0


def test_a_reviewer_other_than_the_one_the_policy_was_trained_against_fails_naming_both(
    trained, tiny_model_dir, tmp_path
):
    copy = _copy(trained, tmp_path / "copy")
    other_model = shutil.copytree(tiny_model_dir, tmp_path / "other-model")  # served under another name
    [trained_against] = _sql(copy, "SELECT DISTINCT reviewer_version FROM teams_operation_policy")["reviewer_version"]
    for asset in ("teams_policy_comparison", "teams_evolved_instructions"):
        with pytest.raises(dg.Failure) as err:
            materialize(copy, str(other_model), smallest_run_config(), selection=[asset])
        message = str(err.value)
        assert trained_against in message and f"{other_model}:q-" in message and asset in message, message
        assert not _sql(copy, f"SELECT count(*) AS n FROM information_schema.tables WHERE table_name = '{asset}'")["n"][
            0
        ]


def test_transitions_of_another_run_fail_before_a_model_opens(trained, tiny_model_dir, tmp_path, monkeypatch):
    copy = _copy(trained, tmp_path / "copy")
    _sql(copy, "UPDATE teams_policy_transitions SET run_id = 'another-run'", read_only=False)
    opened = []
    monkeypatch.setattr(LanguageModelResource, "open_models", lambda self, adapters: opened.append(adapters))
    with pytest.raises(dg.Failure, match="another-run.*teams_operation_policy was trained by run"):
        materialize(copy, str(tiny_model_dir), smallest_run_config(), selection=["teams_policy_comparison"])
    assert opened == []


def test_a_policy_table_without_the_settings_fails_asking_to_materialize_it_again(trained, tiny_model_dir, tmp_path):
    copy = _copy(trained, tmp_path / "copy")
    _sql(copy, "ALTER TABLE teams_operation_policy DROP COLUMN settings", read_only=False)
    with pytest.raises(dg.Failure, match="record no settings: materialize teams_operation_policy again"):
        materialize(copy, str(tiny_model_dir), smallest_run_config(), selection=["teams_evolved_instructions"])
