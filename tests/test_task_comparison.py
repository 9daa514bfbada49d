"""The evaluation summary: share of tasks one model beats another, its bootstrap CI, ties."""

import pytest

from refine_af_pipeline.evaluation.task_comparison import compare_over_tasks, mean_per_model

pytestmark = pytest.mark.unit


def test_hand_made_table_counts_wins_ties_and_losses():
    refine = {"a": 0.50, "b": 0.40, "c": 0.30, "d": 0.20, "e": 0.90}
    selfinstruct = {"a": 0.40, "b": 0.40, "c": 0.40, "d": 0.10, "e": 0.80}
    c = compare_over_tasks(refine, selfinstruct, "refine_af", "self_instruct", resamples=4_000)
    assert (c.n_tasks, c.wins, c.ties, c.losses) == (5, 3, 1, 1)
    assert c.win_share == pytest.approx(0.6) and c.tie_share == pytest.approx(0.2)
    assert c.mean_difference == pytest.approx((0.1 + 0 - 0.1 + 0.1 + 0.1) / 5)
    assert 0.0 <= c.win_share_ci_low <= c.win_share <= c.win_share_ci_high <= 1.0
    # Five tasks: the interval is wide, and a resampled share is a multiple of 1/5.
    assert c.win_share_ci_low <= 0.2 and c.win_share_ci_high >= 1.0 - 1e-9
    assert c.as_dict()["loss_share"] == pytest.approx(0.2)


def test_equal_scores_are_ties_not_wins():
    scores = {f"t{k}": k / 10 for k in range(6)}
    c = compare_over_tasks(scores, dict(scores))
    assert (c.wins, c.ties, c.losses) == (0, 6, 0)
    assert c.win_share == c.win_share_ci_low == c.win_share_ci_high == 0.0


def test_ci_of_the_share_matches_the_normal_approximation_on_many_tasks():
    # 100 tasks, 60 won: the share's standard error is sqrt(0.6 * 0.4 / 100) = 0.049.
    candidate = {f"t{k}": 1.0 if k < 60 else 0.0 for k in range(100)}
    reference = {f"t{k}": 0.5 for k in range(100)}
    c = compare_over_tasks(candidate, reference, resamples=10_000, seed=3)
    assert c.win_share == 0.6
    assert c.win_share_ci_low == pytest.approx(0.6 - 1.96 * 0.049, abs=0.02)
    assert c.win_share_ci_high == pytest.approx(0.6 + 1.96 * 0.049, abs=0.02)
    again = compare_over_tasks(candidate, reference, resamples=10_000, seed=3)
    assert again == c  # fixed seed: the same table gives the same interval


def test_different_task_sets_are_refused():
    with pytest.raises(ValueError, match="different tasks"):
        compare_over_tasks({"a": 1.0, "b": 0.0}, {"a": 1.0}, "refine_af", "self_instruct")


def test_mean_per_model_weighs_every_task_the_same():
    assert mean_per_model({"base": {"a": 0.2, "b": 0.4}, "refine_af": {"a": 0.6, "b": 0.0}}) == pytest.approx(
        {"base": 0.3, "refine_af": 0.3}
    )


def test_summary_rows_compare_every_pair_on_each_metric_with_its_own_tie_tolerance():
    from refine_af_pipeline.evaluation.task_comparison import summary_rows, tasks_differing

    by_metric = {
        "rouge_l": {"base": {"a": 0.5, "b": 0.2, "c": 0.1}, "tuned": {"a": 0.5, "b": 0.3, "c": 0.0}},
        # log-likelihoods: a change of 5e-5 nats/token is batching noise (a tie), 0.02 is not.
        "log_likelihood": {"base": {"a": -2.0, "b": -1.5, "c": -3.0}, "tuned": {"a": -1.98, "b": -1.49995, "c": -3.5}},
    }
    rows = summary_rows(by_metric, [("tuned", "base")], resamples=2_000)
    assert [r["metric"] for r in rows] == ["rouge_l", "log_likelihood"]
    rouge, ll = rows
    assert (rouge["wins"], rouge["ties"], rouge["losses"]) == (1, 1, 1)
    assert (ll["wins"], ll["ties"], ll["losses"]) == (1, 1, 1)
    assert ll["mean_difference"] == pytest.approx((0.02 + 0.00005 - 0.5) / 3)
    assert ll["mean_difference_ci_low"] <= ll["mean_difference"] <= ll["mean_difference_ci_high"]
    assert rouge["win_share"] == pytest.approx(1 / 3) and rouge["candidate"] == "tuned"
    assert tasks_differing(by_metric["log_likelihood"]["tuned"], by_metric["log_likelihood"]["base"], 0.01) == 2
