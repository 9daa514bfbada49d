"""teams_operation_policy's table as the hand-over: the settings, policy file, reviewer and run the
stages after it read, and the conflicts they refuse to run with."""

import json

import pytest

from refine_af_pipeline.teams.instructor import InstructorSettings
from refine_af_pipeline.teams.trained_policy import HANDED_OVER, TrainedPolicy, policy_log_frame

pytestmark = pytest.mark.unit

SETTINGS = InstructorSettings(operations=["breadth", "deepen", "concretize"], horizon=4, heldout_share=0.25)
LOG = [{"update": 1, "mean_reward": 0.2}, {"update": 2, "mean_reward": 0.3}]
REVIEWER = "teams-information-gain/v1:/models/tiny:q-0123abcd"


def _trained() -> TrainedPolicy:
    rows = policy_log_frame(
        LOG, "/data/artifacts/teams_operation_policy/run-a/instructor_trpo.zip", REVIEWER, SETTINGS, "run-a"
    )
    return TrainedPolicy.from_rows(rows, "/copy/artifacts/teams_operation_policy/run-a/instructor_trpo.zip")


def test_the_table_hands_over_the_settings_reviewer_and_run():
    rows = policy_log_frame(LOG, "/p.zip", REVIEWER, SETTINGS, "run-a")
    assert rows.columns == ["update", "mean_reward", "policy_path", "reviewer_version", "settings", "run_id"]
    assert set(HANDED_OVER) <= set(rows.columns) and rows["settings"].n_unique() == 1
    trained = _trained()
    assert trained.settings == SETTINGS and trained.settings.heldout_share == 0.25
    assert (trained.reviewer_version, trained.run_id) == (REVIEWER, "run-a")
    assert trained.policy_file.startswith("/copy/")  # the file as found in this data folder


def test_a_reviewer_other_than_the_policys_is_a_conflict_naming_both():
    trained = _trained()
    assert trained.reviewer_conflict("teams_policy_comparison", REVIEWER) is None
    other = "teams-information-gain/v1:/models/other:q-0123abcd"
    message = trained.reviewer_conflict("teams_policy_comparison", other)
    assert other in message and REVIEWER in message and "run-a" in message and "teams_policy_comparison" in message


def test_transitions_of_another_run_are_a_conflict_naming_both_runs():
    trained = _trained()
    assert trained.transitions_conflict(["run-a", "run-a"]) is None
    message = trained.transitions_conflict(["run-b"])
    assert "run-b" in message and "run-a" in message and "teams_policy_transitions" in message
    assert "none" in trained.transitions_conflict([])


def test_settings_this_version_cannot_read_fail_naming_the_run():
    rows = policy_log_frame(LOG, "/p.zip", REVIEWER, SETTINGS, "run-a")
    stale = rows.with_columns(rows["settings"].map_elements(lambda s: json.dumps({**json.loads(s), "gone": 1})))
    with pytest.raises(ValueError, match="run-a.*materialize teams_operation_policy again"):
        TrainedPolicy.from_rows(stale, "/p.zip")
