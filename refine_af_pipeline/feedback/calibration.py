"""Calibrating the reward weights to human ratings: least squares on the standardised components.

The ratings file is CSV (UTF-8, comma-separated, header line first):

    instruction_id,rating,output
    3f2a9c1e-00004-01,4,"Paris is the capital of France."

- instruction_id (required): an instruction_id in reward_scores; the rating is for the base model's
  instance of that instruction, as reward_scores shows it.
- rating (required): a number, higher = better, on any scale whose low end stays above the format
  gate's fixed reward (-3), e.g. 1-5 or 1-10. The calibrated reward is then the predicted rating.
- output (optional): the output text that was rated. When reward_scores has been regenerated since,
  a row whose output no longer matches is skipped instead of being fitted against other text.
Other columns are ignored. The fit is rating ~ bias + sum_i w_i z_i over the rated instances that
passed the instance gate, with z_i the component standardised by the base model's mean and spread.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..text_files import decode_utf8
from .gates import DEFAULT_GATE_REWARD
from .scores import ComponentStats, standardise

REQUIRED_COLUMNS = ("instruction_id", "rating")


class CalibrationFileError(ValueError):
    """A ratings file that cannot be used; the message names the file and where."""


class CalibrationError(ValueError):
    """Ratings that do not determine the weights (too few, or not varied enough)."""


@dataclass(frozen=True)
class Rating:
    instruction_id: str
    rating: float
    output: str | None
    line: int


@dataclass(frozen=True)
class Calibration:
    weights: dict[str, float]
    bias: float
    n: int  # rated instances the fit used
    rmse: float  # root mean squared residual, in rating units
    r2: float
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rated rows not used


def read_ratings(path: str | Path, gate_reward: float = DEFAULT_GATE_REWARD) -> list[Rating]:
    """Every rating in the file, or a CalibrationFileError naming the file, line and column. Every
    rating must lie above `gate_reward`, the reward of a gated instance."""
    path = Path(path)
    if not path.exists():
        raise CalibrationFileError(f"{path}: ratings file not found")
    if not path.is_file():
        raise CalibrationFileError(f"{path}: not a file")
    text = decode_utf8(path, path.read_bytes(), CalibrationFileError, skip_bom=True)
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise CalibrationFileError(f"{path}: empty file (expected a header line: instruction_id,rating[,output])")
    header = [h.strip() for h in reader.fieldnames]
    reader.fieldnames = header
    for column in REQUIRED_COLUMNS:
        if column not in header:
            raise CalibrationFileError(f"{path}:1: missing column '{column}' (the header has {header})")
    ratings: list[Rating] = []
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        instruction_id = (row.get("instruction_id") or "").strip()
        if not instruction_id:
            raise CalibrationFileError(f"{path}:{line}: column 'instruction_id' is empty")
        raw = (row.get("rating") or "").strip()
        try:
            rating = float(raw)
        except ValueError:
            raise CalibrationFileError(f"{path}:{line}: column 'rating': '{raw}' is not a number") from None
        if not math.isfinite(rating):
            raise CalibrationFileError(f"{path}:{line}: column 'rating': '{raw}' is not a finite number")
        if instruction_id in first_line:
            raise CalibrationFileError(
                f"{path}:{line}: duplicate instruction_id '{instruction_id}' "
                f"(first on line {first_line[instruction_id]})"
            )
        first_line[instruction_id] = line
        output = row.get("output")  # an empty cell means the text was not given
        ratings.append(Rating(instruction_id, rating, output if output and output.strip() else None, line))
    if not ratings:
        raise CalibrationFileError(f"{path}: no ratings below the header line")
    low = min(r.rating for r in ratings)
    if low <= gate_reward:
        where = next(r.line for r in ratings if r.rating == low)
        raise CalibrationFileError(
            f"{path}:{where}: column 'rating': {low:g} is at or below the instance gate's fixed "
            f"reward ({gate_reward:g}); shift the scale so that any rated instance "
            "beats an unparseable one"
        )
    return ratings


def fit_weights(
    z_rows: Sequence[Mapping[str, float]], ratings: Sequence[float], components: Sequence[str]
) -> tuple[dict[str, float], float, float, float]:
    """(weights, bias, rmse, r2) of the least-squares fit rating ~ bias + sum_i w_i z_i."""
    import numpy as np

    n, p = len(ratings), len(components) + 1
    if n < p + 1:
        raise CalibrationError(
            f"calibration needs at least {p + 1} rated instances that passed the instance gate "
            f"to fit {p} numbers ({len(components)} weights and a bias); it has {n}"
        )
    design = np.array([[row[c] for c in components] + [1.0] for row in z_rows], dtype=float)
    target = np.asarray(ratings, dtype=float)
    coef, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
    if rank < p:
        raise CalibrationError(
            f"the rated instances do not separate the components (design rank {rank} of {p}): "
            "rate more instances, or more varied ones"
        )
    residual = target - design @ coef
    spread = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / spread if spread > 0 else math.nan
    weights = {c: float(w) for c, w in zip(components, coef[:-1])}
    return weights, float(coef[-1]), float(np.sqrt((residual**2).mean())), r2


def calibrate(
    instruction_ids: Sequence[str],
    rows: Sequence[Mapping],
    stats: ComponentStats,
    ratings: Sequence[Rating],
    components: Sequence[str],
) -> Calibration:
    """Join the ratings to the scored rows (reward_scores) by instruction_id and fit the weights."""
    by_id = dict(zip(instruction_ids, rows))
    skipped = {"not_in_reward_scores": 0, "failed_instance_gate": 0, "output_changed": 0}
    z_rows, targets = [], []
    for r in ratings:
        row = by_id.get(r.instruction_id)
        if row is None:
            skipped["not_in_reward_scores"] += 1
        elif row["gate_reason"] is not None:
            skipped["failed_instance_gate"] += 1
        elif r.output is not None and " ".join(r.output.split()) != " ".join(row["output"].split()):
            skipped["output_changed"] += 1
        else:
            z_rows.append(standardise({c: row[c] for c in components}, stats))
            targets.append(r.rating)
    try:
        weights, bias, rmse, r2 = fit_weights(z_rows, targets, components)
    except CalibrationError as exc:
        raise CalibrationError(f"{exc} (rated rows not used: {skipped})") from None
    return Calibration(weights, bias, len(targets), rmse, r2, {k: v for k, v in skipped.items() if v})
