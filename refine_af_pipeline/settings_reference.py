"""docs/settings.md, generated from the code: one table per run-config section and per resource.

    python -m refine_af_pipeline.settings_reference          # (re)write docs/settings.md
    python -m refine_af_pipeline.settings_reference --check  # exit 1 if the committed file differs

What is read, and from where:
- **Stages.** Every executable node of the Definitions' asset graph (assets, multi-assets and asset
  checks) whose function takes a `config` argument: its annotation is the node's `dg.Config` class
  (resolved with `typing.get_type_hints`, so string annotations work). A node whose op has a config
  schema but no such argument stops the script, so no run config goes undocumented silently. A field
  whose type is itself a pydantic model (`sft` of `sft_training_pairs`) is expanded into dotted rows.
- **Resources.** The resources the Definitions bind, as `default_resources()` builds them with no
  REFINE_AF_* variable set (so the audit model's defaults are the audit judge's, not the base
  model's); paths under the data folder are written as `<data dir>`. A resource the Definitions
  bind that `default_resources()` does not build stops the script.
- **Profiles.** Each sized profile's run config (`profiles.profile_run_config`), one column each. A
  key of a profile that no settings field has stops the script: the docs cannot show a value that
  the run would reject.

Order: stages in the asset graph's topological order (a node after every node it reads; ties
alphabetical), then resources alphabetically; fields in their class's declaration order.
"""

from __future__ import annotations

import argparse
import ast
import heapq
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import NoneType, UnionType

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "settings.md"
COMMAND = "python -m refine_af_pipeline.settings_reference"
ENV_PREFIX = "REFINE_AF_"
# default_resources() resolves its root; this stand-in is replaced by DATA_DIR_TEXT in the tables.
_DATA_ROOT = Path("/refine-af-settings-reference-data-dir")
DATA_DIR_TEXT = "<data dir>"
WIDTH = 100  # prose lines of the page (tables are one line a row)


class SettingsReferenceError(RuntimeError):
    """The code or a profile is in a state the reference cannot describe faithfully."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Row:
    field: str  # dotted for nested models
    type: str
    default: str
    profile_values: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Section:
    name: str  # the op's name, or the resource key
    intro: str
    rows: tuple[Row, ...]


# ---------------------------------------------------------------------------------------------
# Rendering of types and values


def _bounds(metadata: list) -> tuple[str | None, str | None]:
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low = f"({item.gt}"
        elif isinstance(item, annotated_types.Ge):
            low = f"[{item.ge}"
        elif isinstance(item, annotated_types.Lt):
            high = f"{item.lt})"
        elif isinstance(item, annotated_types.Le):
            high = f"{item.le}]"
    return low, high


def _constrained(name: str, metadata: list) -> str:
    low, high = _bounds(metadata)
    if low and high:
        return f"{name} in {low}, {high}"
    if low:
        return f"{name} {'>' if low[0] == '(' else '>='} {low[1:]}"
    if high:
        return f"{name} {'<' if high[-1] == ')' else '<='} {high[:-1]}"
    return name


def type_text(annotation, metadata: list | None = None) -> str:
    """A readable name for a field's type, with its numeric bounds (`int > 0`, `float in [0, 1]`)."""
    metadata = list(metadata or [])
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*annotation.__metadata__, *metadata])
    if annotation is NoneType:
        return "null"
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, UnionType):
        parts = [type_text(a, metadata) for a in args if a is not NoneType]
        return " or ".join(parts + (["null"] if NoneType in args else []))
    if origin in (list, tuple, set, frozenset):
        inner = ", ".join(type_text(a) for a in args if a is not Ellipsis) or "any"
        return f"list of {inner}"
    if origin is dict:
        key, value = (type_text(a) for a in args) if args else ("any", "any")
        return f"mapping of {key} to {value}"
    name = getattr(annotation, "__name__", None) or str(annotation)
    return _constrained(name, metadata)


def value_text(value) -> str:
    """A value as a run config (YAML) would spell it."""
    if value is REQUIRED:
        return "required"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, separators=(", ", ": "), default=str)
    if isinstance(value, str):
        text = value.replace(str(_DATA_ROOT), DATA_DIR_TEXT)
        return text if text.strip() == text and text else json.dumps(text)
    return repr(value) if isinstance(value, float) else str(value)


_CODE_SPAN = re.compile(r"(`+[^`]*`+)")


def prose(text: str) -> str:
    """`text` with `<` escaped outside code spans, so `<seed file>` is not read as an HTML tag."""
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;") for p in _CODE_SPAN.split(text))


def cell(text: str) -> str:
    """Text for one table cell: one line, `|` escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def code(text: str) -> str:
    if not text:
        return ""
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


# ---------------------------------------------------------------------------------------------
# Fields


def _nested_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _trailing_comments(cls: type) -> dict[str, str]:
    """field name -> the comment at the end of its declaration's line, for fields declared in `cls`
    without a description (`device: str = "auto"  # auto | cpu | cuda ...`)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line[: token.start[1]].strip():
            comments[token.start[0]] = token.string.lstrip("#").strip()
    result = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment = comments.get(node.end_lineno) or comments.get(node.lineno)
            if comment:
                result[node.target.id] = comment
    return result


def _description(cls: type[BaseModel], name: str, info: FieldInfo) -> str:
    if info.description:
        return info.description
    for owner in cls.__mro__:
        if name in owner.__dict__.get("__annotations__", {}):
            return _trailing_comments(owner).get(name, "")
    return ""


def walk_fields(cls: type[BaseModel], values: BaseModel | None = None, prefix: str = "") -> Iterator[tuple]:
    """(dotted name, FieldInfo, default, owner class) of every leaf field, nested models expanded.
    `values`: an instance whose attributes are the defaults (a bound resource, a nested default)."""
    for name, info in cls.model_fields.items():
        if values is not None:
            default = getattr(values, name)
        elif info.is_required():
            default = REQUIRED
        else:
            default = info.get_default(call_default_factory=True)
        nested = _nested_model(info.annotation)
        if nested is not None:
            yield from walk_fields(nested, default if isinstance(default, BaseModel) else None, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info, default, cls


# ---------------------------------------------------------------------------------------------
# Profiles


def profile_configs() -> dict[str, dict]:
    """Each sized profile's run config, in the order profiles.PROFILES names them."""
    from refine_af_pipeline.profiles import METHOD, PROFILES, profile_run_config

    return {name: profile_run_config(name) for name in PROFILES if name != METHOD}


_MISSING = object()


def _lookup(config, dotted: str):
    for part in dotted.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _unknown_keys(config, fields: set[str], prefix: str = "") -> list[str]:
    """Keys of `config` (a section's `config` mapping) that are no documented field."""
    unknown = []
    for key, value in (config or {}).items():
        path = f"{prefix}{key}"
        if path in fields:
            continue
        if isinstance(value, Mapping) and any(f.startswith(path + ".") for f in fields):
            unknown += _unknown_keys(value, fields, path + ".")
        else:
            unknown.append(path)
    return unknown


def _rows(cls: type[BaseModel], values: BaseModel | None, section_configs: dict[str, dict]) -> tuple[Row, ...]:
    rows = []
    for dotted, info, default, owner in walk_fields(cls, values):
        profile_values = tuple(
            "" if (v := _lookup(section_configs[p], dotted)) is _MISSING else code(value_text(v))
            for p in section_configs
        )
        rows.append(
            Row(
                field=code(dotted),
                type=prose(type_text(info.annotation, info.metadata)),
                default=code(value_text(default)),
                profile_values=profile_values,
                description=prose(_description(owner, dotted.rsplit(".", 1)[-1], info)),
            )
        )
    return tuple(rows)


def _source(cls: type) -> str:
    try:
        path = Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT)
    except (TypeError, ValueError):
        return f"`{cls.__name__}`"
    return f"`{cls.__name__}` (`{path.as_posix()}`)"


def _settings_bases(cls: type) -> list[type]:
    """The project's settings classes a Config or resource class takes its fields from."""
    return [b for b in cls.__bases__ if issubclass(b, BaseModel) and not b.__module__.startswith("dagster")]


# ---------------------------------------------------------------------------------------------
# The Definitions


def _config_class(node) -> type | None:
    fn = getattr(node, "compute_fn", None)
    has_config_arg = getattr(fn, "has_config_arg", None)
    if has_config_arg is None or not has_config_arg():
        return None
    hints = typing.get_type_hints(fn.decorated_fn, include_extras=False)
    annotation = hints.get("config")
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _has_config_schema(node) -> bool:
    schema = node.config_schema
    if schema is None:
        return False
    fields = getattr(schema.as_field().config_type, "fields", None)
    return bool(fields)


def _nodes_in_topological_order(asset_graph) -> list:
    """(node name, assets definition) of every executable node: a node after every node it reads,
    ties alphabetical."""
    by_name, producer = {}, {}
    for assets_def in asset_graph.assets_defs:
        if not assets_def.is_executable:
            continue
        name = assets_def.node_def.name
        by_name[name] = assets_def
        for key in assets_def.keys:
            producer[key] = name
        for check_key in assets_def.check_keys:
            producer[check_key] = name
    upstream: dict[str, set[str]] = {name: set() for name in by_name}
    for name, assets_def in by_name.items():
        keys = set(assets_def.keys_by_input_name.values())
        keys |= {check_key.asset_key for check_key in assets_def.check_keys}
        upstream[name] = {producer[k] for k in keys if k in producer} - {name}
    downstream: dict[str, set[str]] = {name: set() for name in by_name}
    for name, parents in upstream.items():
        for parent in parents:
            downstream[parent].add(name)
    waiting = {name: len(parents) for name, parents in upstream.items()}
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for child in downstream[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    if len(order) != len(by_name):
        raise SettingsReferenceError(f"the asset graph has a cycle among {sorted(set(by_name) - set(order))}")
    return [(name, by_name[name]) for name in order]


def _writes(assets_def) -> str:
    assets = sorted(key.to_user_string() for key in assets_def.keys)
    checks = sorted(f"`{k.name}` (on `{k.asset_key.to_user_string()}`)" for k in assets_def.check_keys)
    parts = []
    if assets:
        parts.append("materializes " + ", ".join(f"`{a}`" for a in assets))
    if checks:
        label = "runs the check " if len(checks) == 1 else "runs the checks "
        parts.append(label + ", ".join(checks))
    return "; ".join(parts)


@contextmanager
def _environment_without(prefix: str):
    saved = {k: v for k, v in os.environ.items() if k.startswith(prefix)}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def _check_profiles(kind: str, documented: dict[str, set[str]], profiles: dict[str, dict]) -> None:
    for profile, config in profiles.items():
        for name, section in (config.get(kind) or {}).items():
            where = f"configs/{profile}.yaml, {kind}.{name}"
            if name not in documented:
                what = "stage" if kind == "ops" else "resource"
                raise SettingsReferenceError(f"{where}: no {what} of that name has settings")
            unknown = _unknown_keys((section or {}).get("config"), documented[name])
            if unknown:
                raise SettingsReferenceError(f"{where}.config sets {', '.join(unknown)}: no such field in its settings")


def build_sections() -> tuple[list[Section], list[Section], list[str], list[str]]:
    """(stage sections, resource sections, names of the stages without run config, profile names)."""
    from refine_af_pipeline import definitions

    profiles = profile_configs()
    stage_sections, documented, unconfigured = [], {}, []
    for name, assets_def in _nodes_in_topological_order(definitions.defs.resolve_asset_graph()):
        node = assets_def.node_def
        cls = _config_class(node)
        if cls is None:
            if _has_config_schema(node):
                raise SettingsReferenceError(
                    f"{name} has a run config schema but no `config: <dg.Config class>` argument; "
                    "refine_af_pipeline/settings_reference.py cannot read its fields"
                )
            unconfigured.append(name)
            continue
        configs = {p: ((c.get("ops") or {}).get(name) or {}).get("config") or {} for p, c in profiles.items()}
        rows = _rows(cls, None, configs)
        documented[name] = {r.field.strip("`") for r in rows}
        bases = _settings_bases(cls)
        origin = f"fields of {', '.join(_source(b) for b in bases)}, as " if bases else ""
        intro = (
            f"Run config `ops: {{{name}: {{config: {{...}}}}}}`; {_writes(assets_def)}. "
            f"Settings: {origin}{_source(cls)}."
        )
        stage_sections.append(Section(name, intro, rows))
    _check_profiles("ops", documented, profiles)

    with _environment_without(ENV_PREFIX):
        resources = definitions.default_resources(_DATA_ROOT)
    bound = set(definitions.defs.resources or {})
    if bound != set(resources):
        raise SettingsReferenceError(
            f"the Definitions bind the resources {sorted(bound)}, default_resources() builds {sorted(resources)}: "
            "refine_af_pipeline/settings_reference.py documents the latter"
        )
    resource_sections, documented, described = [], {}, {}
    for key in sorted(resources):
        resource = resources[key]
        cls = type(resource)
        configs = {p: ((c.get("resources") or {}).get(key) or {}).get("config") or {} for p, c in profiles.items()}
        rows = _rows(cls, resource, configs)
        documented[key] = {r.field.strip("`") for r in rows}
        bases = _settings_bases(cls)
        origin = f", with the fields of {', '.join(_source(b) for b in bases)}" if bases else ""
        intro = f"Run config `resources: {{{key}: {{config: {{...}}}}}}`; class {_source(cls)}{origin}."
        docstring = cls.__dict__.get("__doc__")
        if cls in described:
            intro += f" The class is described under [`{described[cls]}`](#{described[cls]})."
        elif docstring:
            described[cls] = key
            intro += "\n\n" + prose(inspect.cleandoc(docstring))
        resource_sections.append(Section(key, intro, rows))
    _check_profiles("resources", documented, profiles)
    return stage_sections, resource_sections, unconfigured, list(profiles)


# ---------------------------------------------------------------------------------------------
# The page

HEADER = """\
# Settings reference

This file is generated from the code by `{command}` (run it after changing a settings class, a
resource field or a file in `configs/`); do not edit it by hand: `tests/test_settings_reference.py`
fails when it differs from what the command writes. Each table lists the fields of one run-config
section: a stage's `ops: {{<op>: {{config: ...}}}}` (its `dg.Config` class, which takes its fields from
the stage's pydantic settings class) or a resource's `resources: {{<key>: {{config: ...}}}}`. A nested
section is written with dotted names (`sft.epochs` is `config: {{sft: {{epochs: ...}}}}`). **default** is
what a run gets when nothing sets the field: for the stages the settings class's default (the method's
full scale), for the resources the value the Definitions bind when no `REFINE_AF_*` environment
variable is set (`{data_dir}` is `REFINE_AF_DATA_DIR`, else `$DAGSTER_HOME/refine_af_data`, else
`./data`). {profile_sentence} Stages are in the asset graph's topological order (a stage after every
stage it reads, ties alphabetical), resources alphabetical, fields in declaration order. What each
setting does to a stage is explained in [stages.md](stages.md).
"""


def _profile_sentence(profiles: list[str]) -> str:
    if not profiles:
        return ""
    files = ", ".join(f"**{p}** (`configs/{p}.yaml`)" for p in profiles)
    return f"The profile columns, {files}, give the value the profile sets; blank where it leaves the default."


def _paragraphs(text: str) -> list[str]:
    """`text` as paragraphs of at most WIDTH characters per line, a blank line between them."""
    lines = []
    for paragraph in text.strip().split("\n\n"):
        lines += [*textwrap.wrap(" ".join(paragraph.split()), WIDTH, break_on_hyphens=False), ""]
    return lines[:-1]


def _table(section: Section, profiles: list[str]) -> list[str]:
    head = ["field", "type", "default", *profiles, "description"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in section.rows:
        cells = [row.field, row.type, row.default, *row.profile_values, row.description]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def render() -> str:
    stages, resources, unconfigured, profiles = build_sections()
    header = HEADER.format(command=COMMAND, data_dir=DATA_DIR_TEXT, profile_sentence=_profile_sentence(profiles))
    title, _, body = header.partition("\n\n")
    lines = [title, "", *_paragraphs(body)]
    lines += ["", "## Stages", ""]
    lines.append("- " + ", ".join(f"[`{s.name}`](#{s.name})" for s in stages))
    if unconfigured:
        lines += ["", *_paragraphs("Steps without a run config: " + ", ".join(f"`{n}`" for n in unconfigured) + ".")]
    for section in stages:
        lines += ["", f"### `{section.name}`", "", *_paragraphs(section.intro), "", *_table(section, profiles)]
    lines += ["", "## Resources", ""]
    lines.append("- " + ", ".join(f"[`{s.name}`](#{s.name})" for s in resources))
    for section in resources:
        lines += ["", f"### `{section.name}`", "", *_paragraphs(section.intro), "", *_table(section, profiles)]
    return "\n".join(lines) + "\n"


def first_difference(expected: str, actual: str) -> str | None:
    """'line N: ...' for the first line where `actual` (the file) differs from `expected`, or None."""
    if expected == actual:
        return None
    want, have = expected.splitlines(), actual.splitlines()
    for number, (w, h) in enumerate(zip(want, have), start=1):
        if w != h:
            return f"line {number}: the file has {h!r}, the code gives {w!r}"
    number = min(len(want), len(have)) + 1
    if len(want) > len(have):
        return f"line {number}: the file ends, the code gives {want[number - 1]!r}"
    if len(have) > len(want):
        return f"line {number}: the code gives no more lines, the file has {have[number - 1]!r}"
    return "the line endings or the final newline differ"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"the page (default: {OUTPUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        difference = first_difference(text, current)
        if difference:
            print(f"{args.output} is out of date ({difference}); regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
