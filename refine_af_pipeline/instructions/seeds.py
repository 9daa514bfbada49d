"""Seed tasks: the human-written pool that bootstraps instruction generation.

Two input formats are accepted: Self-Instruct's seed JSONL (one task per line with id, name,
instruction, instances, is_classification) and Alpaca JSON (a list of {instruction, input, output}).
Every problem is reported with the file and line (or list index) it was found at, and nothing is
returned unless the whole file is valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..text_files import decode_utf8

BUILTIN_SEED_FILE = "seed_tasks.jsonl"


class SeedFileError(ValueError):
    """A seed file that cannot be used; the message names the file and where."""


@dataclass(frozen=True)
class Instance:
    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    id: str
    name: str
    instruction: str
    instances: tuple[Instance, ...]
    is_classification: bool
    source: str = field(default="builtin")


def builtin_seed_path() -> Path:
    return Path(str(resources.files("refine_af_pipeline") / "data" / BUILTIN_SEED_FILE))


def _require_str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise SeedFileError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise SeedFileError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise SeedFileError(f"{where}: field '{key}' is empty")
    return value


def _parse_self_instruct_task(obj: object, where: str, source: str) -> SeedTask:
    if not isinstance(obj, dict):
        raise SeedFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    task_id = _require_str(obj, "id", where)
    instruction = _require_str(obj, "instruction", where)
    name = obj.get("name", task_id)
    if not isinstance(name, str):
        raise SeedFileError(f"{where}: field 'name' must be a string")
    raw_instances = obj.get("instances")
    if not isinstance(raw_instances, list) or not raw_instances:
        raise SeedFileError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
    instances = []
    for k, inst in enumerate(raw_instances):
        iwhere = f"{where}, instances[{k}]"
        if not isinstance(inst, dict):
            raise SeedFileError(f"{iwhere}: expected an object with input and output")
        instances.append(
            Instance(
                input=_require_str(inst, "input", iwhere, allow_empty=True),
                output=_require_str(inst, "output", iwhere),
            )
        )
    is_cls = obj.get("is_classification", False)
    if not isinstance(is_cls, bool):
        raise SeedFileError(f"{where}: field 'is_classification' must be true or false")
    return SeedTask(task_id, name, instruction.strip(), tuple(instances), is_cls, source)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise SeedFileError(f"{path}: seed file not found")
    if not path.is_file():
        raise SeedFileError(f"{path}: not a file")
    return decode_utf8(path, path.read_bytes(), SeedFileError)


def _load_jsonl(path: Path, text: str, source: str) -> list[SeedTask]:
    tasks = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SeedFileError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        tasks.append(_parse_self_instruct_task(obj, where, source))
    return tasks


def _load_alpaca(path: Path, text: str, source: str) -> list[SeedTask]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SeedFileError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(records, list):
        raise SeedFileError(f"{path}: Alpaca JSON must be a list of {{instruction, input, output}} objects")
    tasks = []
    for k, rec in enumerate(records):
        where = f"{path}: item {k}"
        if not isinstance(rec, dict):
            raise SeedFileError(f"{where}: expected an object")
        instruction = _require_str(rec, "instruction", where)
        inst = Instance(
            _require_str(rec, "input", where, allow_empty=True) if "input" in rec else "",
            _require_str(rec, "output", where),
        )
        tasks.append(SeedTask(f"alpaca_{k}", f"alpaca_{k}", instruction.strip(), (inst,), False, source))
    return tasks


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Load seed tasks from `path` (Self-Instruct JSONL or Alpaca JSON), or the built-in pool."""
    source = "builtin" if path is None else str(path)
    file = builtin_seed_path() if path is None else Path(path)
    text = _read_text(file)
    if not text.strip():
        raise SeedFileError(f"{file}: seed file is empty")
    # Alpaca files are one JSON list; Self-Instruct files are one object per line.
    tasks = _load_alpaca(file, text, source) if text.lstrip().startswith("[") else _load_jsonl(file, text, source)
    if not tasks:
        raise SeedFileError(f"{file}: no seed tasks found")
    seen: dict[str, int] = {}
    for k, task in enumerate(tasks):
        if task.id in seen:
            raise SeedFileError(f"{file}: duplicate task id '{task.id}' (entries {seen[task.id] + 1} and {k + 1})")
        seen[task.id] = k
    return tasks


class SeedPoolSettings(BaseModel):
    """Settings of `seed_pool`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed_file: str | None = Field(
        None, description="Self-Instruct JSONL or Alpaca JSON; the built-in 175 tasks if unset"
    )
