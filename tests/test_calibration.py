"""Least-squares calibration of the reward weights to human ratings, and the ratings file's errors."""

import numpy as np
import pytest

from refine_af_pipeline.feedback.calibration import (
    CalibrationError,
    CalibrationFileError,
    Rating,
    calibrate,
    read_ratings,
)
from refine_af_pipeline.feedback.scores import COMPONENTS, ComponentStats, standardise

pytestmark = pytest.mark.unit

TRUE_WEIGHTS = {
    "preference": 1.2,
    "naturalness": 0.4,
    "coherence": -0.3,
    "understandability": 0.1,
    "learned_reward": 0.1,
}
TRUE_BIAS = 5.0


def _scored_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        dict(output=f"output {k}", gate_reason=None, **{c: float(rng.uniform(0, 1)) for c in COMPONENTS})
        for k in range(n)
    ]


def _synthetic_ratings(rows, stats, noise: float, seed: int = 1) -> list[Rating]:
    rng = np.random.default_rng(seed)
    ratings = []
    for k, row in enumerate(rows):
        z = standardise({c: row[c] for c in COMPONENTS}, stats)
        value = TRUE_BIAS + sum(TRUE_WEIGHTS[c] * z[c] for c in COMPONENTS) + rng.normal(0, noise)
        ratings.append(Rating(f"id-{k}", float(value), None, k + 2))
    return ratings


def test_fit_recovers_known_weights_from_noisy_ratings():
    rows = _scored_rows(200)
    stats = ComponentStats.from_rows(rows)
    ratings = _synthetic_ratings(rows, stats, noise=0.05)
    fit = calibrate([f"id-{k}" for k in range(200)], rows, stats, ratings, COMPONENTS)
    for c in COMPONENTS:
        assert fit.weights[c] == pytest.approx(TRUE_WEIGHTS[c], abs=0.02), c
    assert fit.bias == pytest.approx(TRUE_BIAS, abs=0.02)
    assert fit.n == 200 and fit.r2 > 0.99
    assert fit.rmse == pytest.approx(0.05, abs=0.015)


def test_fit_uses_only_the_configured_components():
    rows = _scored_rows(50)
    stats = ComponentStats.from_rows(rows)
    fit = calibrate(
        [f"id-{k}" for k in range(50)],
        rows,
        stats,
        _synthetic_ratings(rows, stats, 0.01),
        ["preference", "naturalness"],
    )
    assert set(fit.weights) == {"preference", "naturalness"}
    assert fit.weights["preference"] == pytest.approx(1.2, abs=0.15)


def test_calibration_skips_rows_it_cannot_use_and_says_why():
    rows = _scored_rows(12)
    rows[0]["gate_reason"] = "empty_output"
    stats = ComponentStats.from_rows(rows[1:])
    ratings = _synthetic_ratings(rows, stats, 0.0)
    ratings[1] = Rating("id-1", ratings[1].rating, "a different output than was scored", 3)
    ratings.append(Rating("id-from-an-older-run", 4.0, None, 14))
    fit = calibrate([f"id-{k}" for k in range(12)], rows, stats, ratings, COMPONENTS)
    assert fit.n == 10
    assert fit.skipped == {"failed_instance_gate": 1, "output_changed": 1, "not_in_reward_scores": 1}
    assert fit.weights["preference"] == pytest.approx(1.2, abs=1e-6)  # noise-free: exact


def test_too_few_or_too_uniform_ratings_are_clear_errors():
    rows = _scored_rows(5)
    stats = ComponentStats.from_rows(rows)
    with pytest.raises(CalibrationError, match="at least 7 rated instances .* it has 5"):
        calibrate([f"id-{k}" for k in range(5)], rows, stats, _synthetic_ratings(rows, stats, 0.1), COMPONENTS)
    rows = _scored_rows(20)
    for row in rows:
        row["coherence"] = 0.5  # constant: its weight cannot be told from the bias
    stats = ComponentStats.from_rows(rows)
    with pytest.raises(CalibrationError, match="rank 5 of 6"):
        calibrate([f"id-{k}" for k in range(20)], rows, stats, _synthetic_ratings(rows, stats, 0.1), COMPONENTS)


def test_ratings_file_is_read_with_optional_output_and_extra_columns(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(
        '\ufeffinstruction_id, rating ,output,rater\na,4,"Two lines,\nwith a comma",ann\nb,2.5,,bob\n', encoding="utf-8"
    )
    ratings = read_ratings(path)
    assert [(r.instruction_id, r.rating, r.output) for r in ratings] == [
        ("a", 4.0, "Two lines,\nwith a comma"),
        ("b", 2.5, None),
    ]
    assert ratings[1].line == 4  # the quoted output spans lines 2-3


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "instruction_id,score\na,1\n",
            r"ratings.csv:1: missing column 'rating' \(the header has \['instruction_id', 'score'\]\)",
        ),
        ("instruction_id,rating\na,4\nb,good\n", r"ratings.csv:3: column 'rating': 'good' is not a number"),
        ("instruction_id,rating\na,4\n,3\n", r"ratings.csv:3: column 'instruction_id' is empty"),
        ("instruction_id,rating\na,4\nb,nan\n", r"ratings.csv:3: column 'rating': 'nan' is not a finite number"),
        ("instruction_id,rating\na,4\nb,3\na,2\n", r"ratings.csv:4: duplicate instruction_id 'a' \(first on line 2\)"),
        ("instruction_id,rating\na,4\nb,-5\n", r"ratings.csv:3: column 'rating': -5 is at or below the instance gate"),
        ("instruction_id,rating\n", r"ratings.csv: no ratings below the header line"),
        ("", r"ratings.csv: empty file"),
    ],
)
def test_bad_ratings_files_name_the_file_line_and_column(tmp_path, content, message):
    path = tmp_path / "ratings.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationFileError, match=message):
        read_ratings(path)


def test_missing_or_non_utf8_ratings_file(tmp_path):
    with pytest.raises(CalibrationFileError, match="nope.csv: ratings file not found"):
        read_ratings(tmp_path / "nope.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes("instruction_id,rating\ncaf\u00e9,4\n".encode("latin-1"))
    with pytest.raises(CalibrationFileError, match=r"latin.csv:2: not valid UTF-8"):
        read_ratings(path)


def test_a_bad_byte_after_a_byte_order_mark_is_placed_where_it_is_in_the_file(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction_id,rating\nabc,4\nx\xe9,3\n")
    with pytest.raises(
        CalibrationFileError, match=r"bom.csv:3: not valid UTF-8 \(invalid continuation byte at byte 32\)"
    ):
        read_ratings(path)
    with pytest.raises(CalibrationFileError, match=r"not a file"):
        read_ratings(tmp_path)
