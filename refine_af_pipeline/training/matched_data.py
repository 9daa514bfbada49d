"""Equal training data for every arm of the comparison.

Each branch keeps a different number of pairs (the RL policy's instances pass the gate more often
than the base model's, TeaMs-RL evolves fewer instructions), so fine-tuning each on all it kept
would mix data quality with data quantity. Here every arm gets the same number of training pairs
and the same number of validation pairs, drawn by a stable hash: the same ids in every run, and
where arms share an instruction pool (REFINE-AF, Self-Instruct, best-of-N all write instances for
the kept instructions), the instructions every sharing arm kept come first, so those arms train
on the same instructions and differ only in the instances. The sizes are set by the sharing arms
(`sft_pairs`, or the smallest of them); an arm outside the pool (TeaMs-RL) gets as many as it
has up to that size, and is named short when it has fewer.

The draw, per arm and slice (validation, train): instructions ordered by (kept by every sharing
arm first, then a salted hash of the id); pairs taken round-robin, one per instruction per round,
each instruction's pairs in hash order of their instance ids; the first `pairs` of that order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ..settings_types import NonNegativeInt, Share
from .sft import VALIDATION_SALT, SFTSettings
from .splits import hash_bucket, stable_split

DRAW_SALT = "sft-draw"


class MatchedDataSettings(BaseModel):
    """Settings of `sft_training_pairs`: how many pairs every arm's SFT trains and validates on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sft_pairs: NonNegativeInt = Field(
        0,
        description=(
            "training pairs per arm (0 = as many as the smallest arm has); an arm with fewer trains on all it has, "
            "and the metadata and the check say so"
        ),
    )
    validation_share: Share = Field(
        0.15,
        description=(
            "share of instructions (salted hash of the id) whose pairs are held out for validation, the same "
            "instructions in every arm that shares the pool"
        ),
    )
    min_validation: NonNegativeInt = Field(
        4,
        description=("hold out at least this many instructions, up to a quarter of the pool (one of a pool of 2 or 3)"),
    )
    sft: SFTSettings = Field(
        default_factory=SFTSettings,
        description=(
            "the SFT settings of every arm's fine-tuned model, defined once and recorded with the draw, so the "
            "arms cannot be trained differently by accident"
        ),
    )


# Validation never takes more than a quarter of an arm's instructions (the rest is what it trains on),
# but takes one from a pool of 2 or 3 so that every arm with something to train on reports a validation loss.
MAX_VALIDATION_FRACTION = 0.25
MIN_VALIDATION_CAP = 1


def validation_ids(instruction_ids: Sequence[str], settings: MatchedDataSettings) -> frozenset[str]:
    """The instructions whose pairs are held out for validation (all pairs of one instruction on one
    side), by the pipeline's stable split with the SFT salt."""
    split = stable_split(
        instruction_ids,
        settings.validation_share,
        VALIDATION_SALT,
        settings.min_validation,
        MAX_VALIDATION_FRACTION,
        MIN_VALIDATION_CAP,
    )
    return split.held


@dataclass(frozen=True)
class ArmDraw:
    arm: str
    kept_pairs: int
    train: list[dict]
    validation: list[dict]
    target_train: int
    target_validation: int
    shared_train_instructions: int  # train instructions every other sharing arm also trains on

    @property
    def short(self) -> bool:
        return len(self.train) < self.target_train or len(self.validation) < self.target_validation


def _ordered(rows: Sequence[dict], preferred: set[str]) -> list[dict]:
    """Round-robin over instructions (preferred ones first, then by hash), pairs in hash order."""
    by_instruction: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_instruction[r["instruction_id"]].append(r)
    order = sorted(by_instruction, key=lambda i: (i not in preferred, hash_bucket(i, DRAW_SALT), i))
    for pairs in by_instruction.values():
        pairs.sort(key=lambda r: (hash_bucket(r["instance_id"], DRAW_SALT), r["instance_id"]))
    rounds = max((len(p) for p in by_instruction.values()), default=0)
    return [by_instruction[i][k] for k in range(rounds) for i in order if k < len(by_instruction[i])]


def draw_matched(
    arms: Mapping[str, Sequence[dict]], sharing: set[str], settings: MatchedDataSettings
) -> dict[str, ArmDraw]:
    """Each arm's training and validation pairs. `arms`: the kept pairs of each arm (dicts with
    instance_id and instruction_id); `sharing`: the arms that write instances for one instruction
    pool. Arms outside it keep their own validation instructions."""
    if not arms:
        raise ValueError("no arm has kept pairs to draw from")
    empty = [a for a, rows in arms.items() if not rows]
    if empty:
        raise ValueError(f"arms with no kept pairs: {empty}")
    sharing = sharing & set(arms)
    # Validation instructions of the shared pool: a split of those every sharing arm kept (so no
    # arm's validation slice is empty because another arm kept other instructions), else of all.
    kept_by = [{r["instruction_id"] for r in arms[a]} for a in sharing]
    common_ids = set.intersection(*kept_by) if kept_by else set()
    shared_ids = sorted(common_ids or set().union(*kept_by))
    held_shared = validation_ids(shared_ids, settings)
    slices: dict[str, dict[str, list[dict]]] = {}
    for arm, rows in arms.items():
        held = held_shared if arm in sharing else validation_ids([r["instruction_id"] for r in rows], settings)
        slices[arm] = {
            "validation": [r for r in rows if r["instruction_id"] in held],
            "train": [r for r in rows if r["instruction_id"] not in held],
        }
    # Instructions every sharing arm kept, per slice: those come first in each sharing arm's order.
    common = {}
    for part in ("validation", "train"):
        sets = [{r["instruction_id"] for r in slices[a][part]} for a in sharing]
        common[part] = set.intersection(*sets) if sets else set()
    # The sizes come from the sharing arms (all arms when none shares), each over arms that have any.
    sizing = [slices[a] for a in (sharing or set(arms))]
    target_train = settings.sft_pairs or min((len(s["train"]) for s in sizing if s["train"]), default=0)
    target_validation = min((len(s["validation"]) for s in sizing if s["validation"]), default=0)
    draws = {}
    for arm, parts in slices.items():
        preferred = common if arm in sharing else {"validation": set(), "train": set()}
        train = _ordered(parts["train"], preferred["train"])[:target_train]
        validation = _ordered(parts["validation"], preferred["validation"])[:target_validation]
        draws[arm] = ArmDraw(arm, len(arms[arm]), train, validation, target_train, target_validation, 0)
    # How far the sharing arms really train on the same instructions.
    train_sets = {a: {r["instruction_id"] for r in draws[a].train} for a in sharing}
    for arm in sharing:
        others = [train_sets[o] for o in sharing if o != arm]
        shared = set.intersection(train_sets[arm], *others) if others else train_sets[arm]
        d = draws[arm]
        draws[arm] = ArmDraw(arm, d.kept_pairs, d.train, d.validation, d.target_train, d.target_validation, len(shared))
    return draws
