"""Instruction pools: the generated instructions of one seed set and one generator model, kept
apart from every other pool. A bootstrap run adds to its own pool and de-duplicates against it
alone, and every stage downstream reads the pool of the latest bootstrap run (the instruction_pool
asset) and refuses tables another pool made, so a new seed file or model never trains on a blend
of pools unless the user names an existing pool."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import PurePath

from ..llm.embedded_model import EMBEDDED_MODEL_ID
from ..llm.models import EMBEDDED
from .seeds import SeedTask

# Rows written before pools were named read as this pool: name it in bootstrap_instructions' `pool` to go on with it.
UNNAMED_POOL = "unnamed"
# Letters, digits, dot, dash and underscore: safe as a file name, a SQL parameter and a Dagster partition key.
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")


class PoolNameError(ValueError):
    """A pool name that cannot be used; the message names it and the rule."""


def check_pool_name(name: str) -> str:
    if not POOL_NAME.fullmatch(name):
        raise PoolNameError(
            f"pool name {name!r} is not usable: 1-120 characters of letters, digits, '.', '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def seed_set_digest(tasks: Sequence[SeedTask]) -> str:
    """sha256 of the seed tasks' content (ids, instructions, instances, labels), independent of the
    file's path or formatting: the same seeds give the same pool wherever the file lies."""
    content = [
        [t.id, t.instruction, [[i.input, i.output] for i in t.instances], t.is_classification]
        for t in sorted(tasks, key=lambda t: t.id)
    ]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"


def generator_name(model: str, served_model_name: str | None = None) -> str:
    """The generator model as it names a pool: the served name where a fleet serves it, else the
    model's last path part (org/name -> name, /models/x -> x); the embedded model by its hub name."""
    if served_model_name:
        model = served_model_name
    elif model == EMBEDDED:
        model = EMBEDDED_MODEL_ID
    return _slug(PurePath(model.rstrip("/")).name or model)


def derived_pool_name(source: str, digest: str, generator: str) -> str:
    """<seed file stem>-<8 hex of the seed digest>--<generator>, e.g. builtin-1a2b3c4d--SmolLM2-135M-Instruct."""
    stem = "builtin" if source == "builtin" else _slug(PurePath(source).stem)
    return check_pool_name(f"{stem[:40]}-{digest[:8]}--{generator[:60]}")
