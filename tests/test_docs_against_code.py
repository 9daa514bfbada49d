"""The README and docs/*.md against the code: every make target, environment variable, command line
and run-config key they tell a reader to use exists in this checkout and its installed tools.

- `make <target>` in a code span or block is a rule of the Makefile; `make t VAR=x` names a variable
  the Makefile reads; `VAR=x make t` names one the Makefile does not set unconditionally.
- an environment variable the docs name is read by the code (a string constant in the package,
  resources, assets, tests or benchmarks; the Makefile, .ci/, dagster.yaml or the service files
  under docs/), is one of the variables
  definitions.model_resource builds as {prefix}_{name}, or is read by the installed library that
  owns its prefix (DAGSTER_ by dagster, HF_ by huggingface_hub, VLLM_ by vllm).
- a command in a code block or span runs an executable of this environment's bin folder, with the
  subcommands and options its --help lists; `python -m X` imports, `python script.py` exists, and
  both take the options their argparse declares; `python -c` compiles; `--config-json` gets JSON.
- `dagster asset materialize --select X` / `dagster asset list --select X` (docs and the Makefile):
  X resolves in refine_af_pipeline.definitions as the CLI parses it, and a materialize selects every
  asset of a step that cannot be subset (bootstrap_instructions, evaluation, ...) or none of them.
- YAML run config (blocks, heredocs, `asset: {config: ...}` spans, configs/*.yaml) and the names
  in settings tables validate against refine_af_job's config schema (the assets' Config classes,
  the resources' fields).
- commands quoted by the code's messages (`make x`, `hf download ...`) pass the same checks.

Every failure names the file, the line and what is wrong.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tokenize
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml
from doc_snippets import (
    ASSIGNMENT,
    ROOT,
    Command,
    Where,
    all_commands,
    commands_of,
    doc_files,
    exported_names,
    read_doc,
    split_words,
)

pytestmark = pytest.mark.unit

BIN = Path(os.path.abspath(sys.executable)).parent  # the environment the tests run in: .venv/bin under make
OTHER_VENVS = [ROOT / ".venv-vllm"]  # the project's second environment (make vllm-setup)
CODE_DIRS = ["refine_af_pipeline", "resources", "assets", "tests", "benchmarks"]
THIS = {Path(__file__).resolve(), (Path(__file__).parent / "doc_snippets.py").resolve()}
# CLIs whose --help lists their subcommands and options in click's layout.
HELP_CLIS = {"dagster", "dagster-webserver", "dagster-daemon", "dagster-graphql", "hf", "pytest"}


@pytest.fixture(scope="module")
def docs():
    return [read_doc(path) for path in doc_files()]


@pytest.fixture(scope="module")
def commands(docs):
    found = []
    for doc in docs:
        found += all_commands(doc)[0]
    return found


def report(problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems), pytrace=False)


# --- the Makefile ------------------------------------------------------------------------------


@cache
def makefile() -> dict:
    """Targets, variable assignments (name -> operator) and the variables it reads."""
    text = (ROOT / "Makefile").read_text()
    logical = re.sub(r"\\\n", " ", text).splitlines()
    targets, assigned, exported = set(), {}, set()
    for line in logical:
        if line.startswith("\t") or line.lstrip().startswith("#") or not line.strip():
            continue
        m = re.match(r"^(override\s+)?(export\s+)?([A-Za-z_]\w*)\s*(\?=|::?=|\+=|!=|=)", line)
        if m:
            assigned[m.group(3)] = m.group(4)
            if m.group(2):
                exported.add(m.group(3))
            continue
        m = re.match(r"^export\s+([\w ]+)$", line)
        if m:
            exported.update(m.group(1).split())
            continue
        m = re.match(r"^([^\s#:=][^:=]*?)\s*::?(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    reads = set(re.findall(r"\$[({](\w+)[)}]", text)) | set(re.findall(r"\$\$\{?([A-Za-z_]\w*)", text))
    return {"targets": targets, "assigned": assigned, "exported": exported, "reads": reads}


def make_problems(command: Command) -> list[str]:
    mk, words, problems = makefile(), command.words[1:], []
    for name in command.assignments:
        op = mk["assigned"].get(name)
        if op is not None and op != "?=":
            problems.append(
                f"{command.where}: `{command.text}`: the Makefile sets {name} with `{op}`, which overrides the "
                f"environment's value: make it `{name} ?= ...` or pass it as `make ... {name}=...`"
            )
    target = None
    for word in words:
        if word.startswith("-"):
            continue
        m = ASSIGNMENT.match(word)
        if m:
            if m.group(1) not in mk["reads"]:
                problems.append(f"{command.where}: `{command.text}`: the Makefile never reads {m.group(1)}")
        elif target is None:
            target = word  # the first target only: prose after it in a message is not a target list
    if target is not None and target not in mk["targets"]:
        problems.append(
            f"{command.where}: `{command.text}`: no target {target!r} in the Makefile "
            f"(its targets: {', '.join(sorted(t for t in mk['targets'] if not t.startswith(('.', '$'))))})"
        )
    return problems


def test_make_targets_and_variables_exist(commands):
    report([p for c in commands if c.words[:1] == ["make"] for p in make_problems(c)])


def test_the_makefile_lets_the_caller_choose_the_run_config_and_downloads():
    """`make run CONFIG=my.yaml` passes that file; `HF_HUB_OFFLINE=0 make ...` reaches the
    recipes (downloads on), and without it they run offline. Asked of make itself (dry run)."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make on PATH")

    def make(*args, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "MAKEFLAGS", "MAKELEVEL")}
        done = subprocess.run(
            ["make", "-s", "--no-print-directory", *args], cwd=ROOT, env=base | env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "--select '*' -c my.yaml" in make("-n", "run", "CONFIG=my.yaml")
    assert "--select '*' -c configs/demo.yaml" in make("-n", "run")
    show = ["--eval", "_show_hf_hub_offline: ; @echo $$HF_HUB_OFFLINE", "_show_hf_hub_offline"]
    assert make(*show).strip() == "1"
    assert make(*show, HF_HUB_OFFLINE="0").strip() == "0"


# --- environment variables ---------------------------------------------------------------------

# Prefixes that mark a name as an environment variable wherever the docs write it, and the
# installed packages that read the third-party ones.
ENV_NAME = re.compile(
    r"(?<![\w$])((?:REFINE_AF|DAGSTER|HF|HUGGINGFACE|VLLM|TOKENIZERS|TRANSFORMERS)(?:_[A-Z0-9]+)*)(_\*)?(?!\w)"
)
OWNERS = {
    "DAGSTER_": ["dagster", "dagster_webserver", "dagster_graphql"],
    "HF_": ["huggingface_hub"],
    "HUGGINGFACE_": ["huggingface_hub"],
    "TRANSFORMERS_": ["transformers"],
    "TOKENIZERS_": ["tokenizers"],
    "VLLM_": ["vllm"],
}


def python_files():
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() not in THIS:
                yield path


@cache
def code_string_constants() -> frozenset[str]:
    """Every upper-case string constant of the code: a variable's name as os.environ, getenv or
    dg.EnvVar read it (directly or through a constant)."""
    found = set()
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.value)
            ):
                found.add(node.value)
    return frozenset(found)


@cache
def model_resource_variables() -> tuple[frozenset[str], frozenset[str]]:
    """The prefixes and names definitions.model_resource reads, {prefix}_{name}: the prefixes are
    its default and those its callers pass (prefix, fallback); the names are those its env()
    helper is asked for, the f"{p}_NAME" strings, and the keys of the module-level tables it
    looks names up in."""
    path = ROOT / "refine_af_pipeline" / "definitions.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "model_resource")
    params = [a.arg for a in fn.args.args]
    defaults = dict(zip(params[len(params) - len(fn.args.defaults) :], fn.args.defaults))
    assert isinstance(defaults.get("prefix"), ast.Constant), "model_resource(prefix=...) has no constant default"
    # The rule itself: somewhere it formats f"{prefix}_{name}". If this fails the rule changed:
    # change this model of it.
    rule = any(
        isinstance(n, ast.JoinedStr)
        and [type(v).__name__ for v in n.values] == ["FormattedValue", "Constant", "FormattedValue"]
        and n.values[1].value == "_"
        for n in ast.walk(fn)
    )
    assert rule, "definitions.model_resource no longer builds variable names as f'{prefix}_{name}'"
    prefixes = {defaults["prefix"].value}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "model_resource":
            given = dict(zip(params, node.args)) | {k.arg: k.value for k in node.keywords}
            prefixes |= {
                v.value for k, v in given.items() if k in ("prefix", "fallback") and isinstance(v, ast.Constant)
            }
    tables = {
        t.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "env" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.add(node.args[0].value)
        elif isinstance(node, ast.JoinedStr) and isinstance(node.values[-1], ast.Constant):
            tail = node.values[-1].value
            if len(node.values) == 2 and re.fullmatch(r"_[A-Z0-9_]+", tail):
                names.add(tail[1:])
        elif isinstance(node, ast.Name) and node.id in tables:
            names |= {k.value for k in tables[node.id].keys if isinstance(k, ast.Constant)}
    return frozenset(prefixes), frozenset(names)


def site_packages() -> list[Path]:
    roots = [Path(sys.prefix), *OTHER_VENVS]
    return [p for root in roots for p in root.glob("lib/python*/site-packages")]


@cache
def read_by_library(name: str) -> bool | None:
    """Whether the installed package that owns the name's prefix mentions it; None when that
    package is installed in none of the project's environments (cannot tell)."""
    owners = next((pkgs for prefix, pkgs in OWNERS.items() if name.startswith(prefix)), None)
    if owners is None:
        return False
    dirs = [str(sp / pkg) for sp in site_packages() for pkg in owners if (sp / pkg).is_dir()]
    if not dirs:
        return None
    return subprocess.run(["grep", "-rqF", "--", name, *dirs], check=False).returncode == 0


def deployment_files() -> list[Path]:
    """The files besides Python and the Makefile that run something: .ci/, the instance's
    dagster.yaml and the service files under docs/ (Dockerfile, compose, systemd units, scripts)."""
    found = [ROOT / "dagster.yaml", *(ROOT / ".ci").glob("*")]
    found += [p for p in (ROOT / "docs").rglob("*") if p.is_file() and p.suffix not in (".md", ".png", ".py", ".js")]
    return [p for p in found if p.is_file()]


@cache
def deployment_reads() -> frozenset[str]:
    """Variables those files read: $NAME / ${NAME} (shell, compose), ARG NAME (Dockerfile),
    `env: NAME` (Dagster's instance yaml)."""
    found = set()
    for path in deployment_files():
        text = path.read_text(errors="replace")
        found |= set(re.findall(r"\$\{?([A-Za-z_]\w*)", text))
        found |= set(re.findall(r"(?m)^\s*ARG\s+([A-Za-z_]\w*)", text))
        found |= set(re.findall(r"\benv:\s*([A-Z_][A-Z0-9_]*)", text))
    return frozenset(found)


def env_problem(name: str, star: bool) -> str | None:
    prefixes, names = model_resource_variables()
    if star:
        if name in prefixes:
            return None
        return (
            f"{name}_* is not a prefix definitions.model_resource reads (its prefixes: {', '.join(sorted(prefixes))})"
        )
    if name in code_string_constants() or name in makefile()["reads"] or name in deployment_reads():
        return None
    if any(name == f"{p}_{n}" for p in prefixes for n in names):
        return None
    by_library = read_by_library(name)
    if by_library:
        return None
    if by_library is None:
        warnings.warn(f"{name}: the library that reads it is not installed here; not checked", stacklevel=2)
        return None
    return (
        f"{name} is read nowhere: not in {', '.join(CODE_DIRS)}, the Makefile, .ci/, dagster.yaml or the service "
        "files under docs/, not one of "
        f"model_resource's {{prefix}}_{{name}} variables, and no installed library that owns the prefix reads it"
    )


def test_environment_variables_are_read_by_the_code(docs, commands):
    mentions: list[tuple[Where, str, bool]] = []
    for doc in docs:
        for number, line in enumerate(doc.lines, 1):
            mentions += [(doc.where(number), m.group(1), bool(m.group(2))) for m in ENV_NAME.finditer(line)]
        mentions += [(where, name, False) for where, name in exported_names(doc)]
    # VAR=value before a command, or a span of assignments (`PYTEST_ARGS='-m unit'`).
    mentions += [
        (c.where, name, False) for c in commands for name in c.assignments if re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
    ]
    problems = []
    seen = set()
    for where, name, star in mentions:
        if ("_" not in name and not star) or (where, name) in seen:
            continue
        seen.add((where, name))
        problem = env_problem(name, star)
        if problem:
            problems.append(f"{where}: {problem}")
    report(problems)


# --- command lines -----------------------------------------------------------------------------


def help_env() -> dict:
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200", HF_HUB_OFFLINE="1")
    env.pop("DAGSTER_HOME", None)
    return env


def run_helps(keys: set[tuple[str, tuple[str, ...]]], cache_: dict) -> None:
    todo = [k for k in keys if k not in cache_]

    def one(key):
        exe, path = key
        done = subprocess.run(
            [str(BIN / exe), *path, "--help"], capture_output=True, text=True, cwd=ROOT, env=help_env(), timeout=120
        )
        return key, (done.returncode, done.stdout + done.stderr)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for key, result in pool.map(one, todo):
            cache_[key] = result


def help_commands(text: str) -> set[str]:
    """Subcommand names under a '... Commands:' heading of a --help text (two-space indented)."""
    names, inside = set(), False
    for line in text.splitlines():
        if re.match(r"^(\S.*)?[Cc]ommands:\s*$", line):
            inside = True
        elif line and not line.startswith(" "):
            inside = False
        elif inside:
            m = re.match(r"^ {2}([a-z][\w-]*)(?:,|\s|$)", line)
            if m:
                names.add(m.group(1))
    return names


def help_options(text: str) -> set[str]:
    options = {"-h", "--help"}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            signature = re.split(r"\s{2,}", stripped)[0]
            options |= set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", signature))
    return options


def option_words(words: list[str]) -> list[str]:
    found = []
    for word in words:
        if word == "--":
            break
        if re.match(r"^--?[A-Za-z]", word):
            found.append(word.split("=", 1)[0])
    return found


@cache
def argparse_options(path: Path) -> frozenset[str] | None:
    """The option strings a script's argparse declares (None when it declares none)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return frozenset(found | {"-h", "--help"}) if found else None


def module_file(module: str) -> Path | None | bool:
    """The file of `module` in this environment or in the project's other venv; False when its
    top-level package is missing from every environment there is (cannot tell)."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else Path(".")
    parts = module.split(".")
    others = [sp for venv in OTHER_VENVS for sp in venv.glob("lib/python*/site-packages")]
    for sp in others:
        base = sp.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py", base / "__main__.py"):
            if candidate.is_file():
                return candidate
    top_known = importlib.util.find_spec(parts[0]) is not None or any((sp / parts[0]).exists() for sp in others)
    return None if top_known else False


def executable(word: str) -> str | None:
    """The executable a command word names in this environment's bin folder, or None when it is
    not one this test checks (a system tool, pip on a remote server, vllm)."""
    for prefix in (".venv/bin/", "$(BIN)/"):
        if word.startswith(prefix):
            return word[len(prefix) :]
    if word.startswith("/") and Path(word).parent == BIN:
        return Path(word).name
    if word in HELP_CLIS | {"huggingface-cli", "python", "python3", "ruff"}:
        return word
    return None


def python_problems(command: Command, where: Where) -> list[str]:
    words, text = command.words, f"`{command.text}`"
    if len(words) < 2:
        return []
    if words[1] == "-c" and len(words) > 2:
        try:
            compile(words[2], "<doc>", "exec")
        except SyntaxError as exc:
            return [f"{where}: {text}: the -c code does not compile: {exc.msg} (column {exc.offset})"]
        return []
    if words[1] == "-m" and len(words) > 2:
        found = module_file(words[2])
        if found is False:
            warnings.warn(f"{where}: {words[2]}: its package is not installed here; not checked", stacklevel=2)
            return []
        if found is None:
            return [f"{where}: {text}: no module {words[2]} in {BIN.parent} or {', '.join(map(str, OTHER_VENVS))}"]
        script, rest = found, words[3:]
    elif words[1].endswith(".py") and not words[1].startswith("-"):
        script, rest = ROOT / words[1], words[2:]
        if not script.is_file():
            return [f"{where}: {text}: no file {words[1]}"]
    else:
        return []
    declared = argparse_options(script) if script.suffix == ".py" else None
    unknown = [o for o in option_words(rest) if declared is not None and o not in declared]
    return [
        f"{where}: {text}: {script.name} takes no option {o} (it declares {', '.join(sorted(declared))})"
        for o in unknown
    ]


def cli_problems(commands: list[Command], helps: dict) -> list[str]:
    """Each command's executable, subcommands and options against its --help, run several at a
    time: one --help per distinct subcommand path, and level by level only where the CLI refuses
    a path."""
    problems: list[str] = []
    guesses = []  # (command, exe, subcommand path)
    for command in commands:
        exe = executable(command.words[0])
        if exe is None:
            continue
        where, text = command.where, f"`{command.text}`"
        if exe in ("python", "python3"):
            if not (BIN / exe).exists():
                problems.append(f"{where}: {text}: no {exe} in {BIN}")
            problems += python_problems(command, where)
            continue
        if not (BIN / exe).is_file():
            hint = (
                " (the installed huggingface_hub's CLI is `hf`: `hf download <repo id>`)"
                if exe == "huggingface-cli"
                else ""
            )
            problems.append(f"{where}: {text}: no executable {exe} in {BIN}{hint}")
            continue
        if "--config-json" in command.words:
            value = command.words[command.words.index("--config-json") + 1 :][:1]
            try:
                json.loads(value[0] if value else "")
            except ValueError:
                problems.append(
                    f"{where}: {text}: --config-json takes inline JSON, not {value[0] if value else 'nothing'!r}: "
                    "pass a run-config file with -c / --config"
                )
        if exe in HELP_CLIS and len(command.words) > 1:
            # First guess: the leading lower-case words are the subcommand path (one --help each).
            path = []
            for word in command.words[1:4]:
                if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                    break
                path.append(word)
            guesses.append((command, exe, tuple(path)))
    run_helps({(exe, path) for _, exe, path in guesses}, helps)
    walks = []
    for command, exe, path in guesses:
        code, text = helps[(exe, path)]
        if code == 0:
            # The CLI accepted the path (click refuses an unknown subcommand before --help).
            problems += option_problems(command, exe, path, text, command.words[1 + len(path) :])
        else:
            walks.append([command, exe, (), command.words[1:]])
    # A path the CLI refused: walk it level by level to name the word it refuses.
    while walks:
        run_helps({(exe, path) for _, exe, path, _ in walks}, helps)
        next_walks = []
        for command, exe, path, rest in walks:
            code, text = helps[(exe, path)]
            name = " ".join([exe, *path])
            if code != 0:
                problems.append(
                    f"{command.where}: `{command.text}`: `{name} --help` failed ({code}): {text.strip()[-300:]}"
                )
                continue
            subcommands = help_commands(text)
            if subcommands and rest and not rest[0].startswith("-"):
                if rest[0] in subcommands:
                    next_walks.append([command, exe, (*path, rest[0]), rest[1:]])
                else:
                    problems.append(
                        f"{command.where}: `{command.text}`: `{name}` has no subcommand {rest[0]!r} "
                        f"(its --help lists {', '.join(sorted(subcommands))})"
                    )
                continue
            problems += option_problems(command, exe, path, text, rest)
        walks = next_walks
    return problems


def option_problems(command: Command, exe: str, path: tuple[str, ...], text: str, rest: list[str]) -> list[str]:
    known = help_options(text)
    name = " ".join([exe, *path])
    return [
        f"{command.where}: `{command.text}`: `{name} --help` lists no option {o}"
        for o in option_words(rest)
        if o not in known
    ]


def pip_problems(command: Command) -> list[str]:
    """`pip install '.[extra]'`: the extra is one of pyproject.toml's."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    problems = []
    for word in command.words[2:]:
        m = re.fullmatch(r"\.\[([\w,-]+)\]", word)
        if m:
            problems += [
                f"{command.where}: `{command.text}`: pyproject.toml has no extra {e!r} (it has {', '.join(extras)})"
                for e in m.group(1).split(",")
                if e not in extras
            ]
    return problems


def script_problems(command: Command) -> list[str]:
    """`bash path`: the script is in the repository."""
    if len(command.words) > 1 and not command.words[1].startswith("-") and not (ROOT / command.words[1]).is_file():
        return [f"{command.where}: `{command.text}`: no file {command.words[1]}"]
    return []


@pytest.fixture(scope="module")
def helps():
    return {}


def makefile_commands() -> list[Command]:
    """The Makefile's own recipe lines that run an executable of the environment."""
    found = []
    lines = (ROOT / "Makefile").read_text().splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line.startswith("\t"):
            continue
        # $(BIN)/x is .venv/bin/x; another make variable stands for one word.
        line = re.sub(r"\$\((\w+)\)", lambda m: ".venv/bin" if m.group(1) == "BIN" else f"MAKEVAR_{m.group(1)}", line)
        words = split_words(line.strip().lstrip("@-"))
        if not words:
            continue
        rest = [w for w in words if not ASSIGNMENT.match(w)]
        if rest and rest[0].startswith(".venv/bin/"):
            start = words.index(rest[0])
            cut = next((j for j, w in enumerate(words) if j > start and w in ("&&", "||", ";", "|")), len(words))
            found.append(Command(Where("Makefile", number), words[start:cut], {}, line.strip()))
    return found


def test_command_lines_run_installed_executables_with_options_they_take(commands, helps):
    commands = [c for c in commands if c.words] + makefile_commands()
    problems = cli_problems(commands, helps)
    for command in commands:
        if command.words[:2] == ["pip", "install"]:
            problems += pip_problems(command)
        if command.words[0] == "bash":
            problems += script_problems(command)
    report(problems)


# --- what the code's own messages tell a user to run -------------------------------------------


def message_commands() -> list[Command]:
    """Commands quoted in the string literals of the package, resources and assets: a `make x` or
    `hf ...` in backticks or opening a parenthesis."""
    found = []
    for folder in ("refine_af_pipeline", "resources", "assets"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            with path.open("rb") as handle:
                for token in tokenize.tokenize(handle.readline):
                    if token.type != tokenize.STRING:
                        continue
                    for m in re.finditer(
                        r"(?:`|\()((?:make|hf|huggingface-cli|dagster|dagster-daemon|dagster-webserver) [^`)]*)",
                        token.string,
                    ):
                        words = split_words(m.group(1).replace("{", "").replace("}", ""))
                        if words:
                            line = token.start[0] + token.string[: m.start()].count("\n")
                            found.append(Command(Where(path.relative_to(ROOT).as_posix(), line), words, {}, m.group(1)))
    return found


def test_commands_in_the_codes_messages_exist(helps):
    """What a missing model's errors tell the user to run (hf download, HF_HUB_OFFLINE=0 make run),
    as the code prints it, and every command quoted in the code's strings."""
    import inspect

    from refine_af_pipeline.llm import models

    model = "nobody/no-such-model"
    not_cached = models.ModelSource(model, model, local_only=True)
    downloads_allowed = models.ModelSource(model, model, local_only=False)  # under HF_HUB_OFFLINE=1
    with pytest.raises(models.ModelUnavailable) as missing:
        models.check_model_available(model)
    printed = [
        (models.check_model_available, str(missing.value)),
        (models.model_unavailable, str(models.model_unavailable(not_cached, OSError("gone")))),
        (models.model_unavailable, str(models.model_unavailable(downloads_allowed, OSError("offline")))),
    ]
    commands = message_commands()
    for function, text in printed:
        where = Where(
            f"refine_af_pipeline/llm/models.py ({function.__name__}'s message)", inspect.getsourcelines(function)[1]
        )
        for inner in re.findall(r"\(([^()]+)\)", text):
            words = split_words(inner)
            if words and (executable(words[0]) or words[0] == "make" or ASSIGNMENT.match(words[0])):
                commands += commands_of(words, where, inner)
    assert any(c.words[1:2] == ["download"] for c in commands), f"no download command in {printed}"
    problems = cli_problems(commands, helps)
    problems += [p for c in commands if c.words[:1] == ["make"] for p in make_problems(c)]
    report(problems)


# --- asset selections --------------------------------------------------------------------------

SELECT_FLAGS = ("--select", "-s")  # `dagster asset materialize/list` take --select (no -s: the options test says so)


@cache
def asset_graph():
    from refine_af_pipeline.definitions import defs

    return defs.resolve_asset_graph()


def asset_selections(command: Command) -> list[tuple[str, str]]:
    """(subcommand, selection) for each --select X / --select=X / -s X of a `dagster asset
    materialize` or `dagster asset list` command. The words are shlex's, shell quotes gone."""
    words = command.words
    if executable(words[0]) != "dagster" or words[1:2] != ["asset"] or words[2:3] not in (["materialize"], ["list"]):
        return []
    found = []
    for i, word in enumerate(words[3:], 3):
        flag, eq, value = word.partition("=")
        if flag in SELECT_FLAGS and eq:
            found.append((words[2], value))
        elif word in SELECT_FLAGS and i + 1 < len(words):
            found.append((words[2], words[i + 1]))
    return found


def selection_problems(command: Command) -> list[str]:
    """Each selection the command passes, parsed and resolved as the CLI does
    (AssetSelection.from_coercible(select.split(",")).resolve(asset graph)). For `materialize`,
    also: every step (AssetsDefinition) that cannot be subset is selected whole (its
    execution_set_asset_keys all in), and dagster's own asset job takes the subset."""
    import dagster as dg

    graph = asset_graph()
    problems = []
    for subcommand, selection in asset_selections(command):
        head = f"{command.where}: `{command.text}`: --select {selection!r}"
        if not selection.strip() or re.search(r"PLACEHOLDER_|MAKEVAR_|\$", selection):
            continue  # <asset>, $(VAR), $VAR: stands for a selection, not one
        selection = selection.strip("'\"")  # quotes that survived (nested in another quoting)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", dg.BetaWarning)  # '*' parses to AssetSelection.all(include_sources=)
                keys = dg.AssetSelection.from_coercible(selection.split(",")).resolve(graph)
        except dg.DagsterError as exc:
            problems.append(f"{head} does not resolve in refine_af_pipeline.definitions: {' '.join(str(exc).split())}")
            continue
        if not keys:
            problems.append(f"{head} selects no asset of refine_af_pipeline.definitions")
            continue
        if subcommand != "materialize":
            continue  # `asset list` only prints: part of a step is a fine thing to list
        steps = {}
        for key in keys:
            node = graph.get(key)
            missing = node.execution_set_asset_keys - keys
            if missing:
                steps[node.assets_def.node_def.name] = (node.execution_set_asset_keys, missing)
        for step, (whole, missing) in sorted(steps.items()):
            writes, lacks = (", ".join(sorted(k.to_user_string() for k in ks)) for ks in (whole, missing))
            problems.append(
                f"{head}: step `{step}` writes {writes} and runs only whole (it cannot be subset); the selection "
                f"lacks {lacks} (dagster refuses the run: 'This AssetsDefinition does not support subsetting')"
            )
        if not steps:
            from refine_af_pipeline.definitions import defs

            try:  # dagster's own word, for whatever the model above misses
                defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=set(keys))
            except dg.DagsterError as exc:
                problems.append(f"{head}: dagster cannot build the run: {' '.join(str(exc).split())}")
    return problems


def test_asset_selections_resolve_and_select_whole_steps(commands):
    """`dagster asset materialize --select X` (and `asset list --select X`) in the README, docs/*.md
    and the Makefile: X resolves in the real definitions, and a multi-asset step that cannot be
    subset (bootstrap_instructions, evaluation, ...) is selected whole or not at all."""
    found = [c for c in [*commands, *makefile_commands()] if c.words and asset_selections(c)]
    assert any(s == "materialize" for c in found for s, _ in asset_selections(c)), "no --select found: parser broken?"
    report([p for c in found for p in selection_problems(c)])


def test_the_selection_check_catches_part_of_a_step():
    """The check above on lines it must refuse: part of bootstrap_instructions' outputs, quoted and
    unquoted, a key that does not exist; and lines it must pass."""

    def check(line: str) -> list[str]:
        return [p for c in commands_of(split_words(line), Where("synthetic", 1), line) for p in selection_problems(c)]

    base = ".venv/bin/dagster asset materialize -m refine_af_pipeline.definitions "
    for select in (
        "--select raw_instructions,deduplicated_instructions",
        "--select 'raw_instructions,deduplicated_instructions'",
        "--select=raw_instructions,deduplicated_instructions",
    ):
        problems = check(base + select)
        assert len(problems) == 1, problems
        assert "synthetic:1" in problems[0] and "`bootstrap_instructions`" in problems[0], problems
        assert problems[0].endswith(
            "lacks instruction_pool (dagster refuses the run: 'This AssetsDefinition does not support subsetting')"
        ), problems
    assert "lacks evaluation_predictions, evaluation_summary" in "".join(check(base + "--select evaluation"))
    assert "does not resolve" in "".join(check(base + "--select 'no_such_asset*'"))
    assert "does not resolve" in "".join(check("dagster asset list -m refine_af_pipeline.definitions -s no_such_asset"))
    # Downstream of raw_instructions is not the whole step: instruction_pool hangs off seed_pool.
    assert "lacks instruction_pool" in "".join(check(base + "--select 'raw_instructions*'"))
    for fine in (
        "--select '*'",
        "--select 'raw_instructions*,instruction_pool*'",
        "--select raw_instructions,deduplicated_instructions,instruction_pool",
    ):
        assert check(base + fine) == [], fine
    assert check("dagster asset list -m refine_af_pipeline.definitions --select raw_instructions") == []
    # The model agrees with dagster: the job refuses the part the check refuses.
    import dagster as dg

    from refine_af_pipeline.definitions import defs

    with pytest.raises(dg.DagsterInvalidSubsetError, match="does not support subsetting"):
        defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_selection={dg.AssetKey("raw_instructions"), dg.AssetKey("deduplicated_instructions")}
        )


# --- run config --------------------------------------------------------------------------------

ROOTS = ("ops", "resources", "execution", "loggers")


@pytest.fixture(scope="module")
def job():
    from refine_af_pipeline.definitions import defs

    return defs.resolve_job_def("refine_af_job")


def schema_keys(job, root: str) -> set[str]:
    return set(job.run_config_schema.config_type.fields[root].config_type.fields)


def is_placeholder(value) -> bool:
    """`...`, `{...}` and `<name>` stand for any value (or, as a key, for any key)."""
    if isinstance(value, str):
        return value.strip() in ("...", "…") or bool(re.fullmatch(r"<[^<>]+>", value.strip()))
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("...", "…")


def normalised(config, path=(), loose=None, open_=None):
    """The config with every placeholder value made "..." (its path goes into `loose`: a type
    error there is no error) and every placeholder key dropped (its mapping goes into `open_`:
    a required field missing there is no error)."""
    loose = set() if loose is None else loose
    open_ = set() if open_ is None else open_
    if is_placeholder(config):
        loose.add(path)
        return "...", loose, open_
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key is None or is_placeholder(str(key)):
                open_.add(path)
                continue
            out[key] = normalised(value, (*path, key), loose, open_)[0]
        return out, loose, open_
    return config, loose, open_


def as_run_config(job, data) -> dict | None:
    """A YAML mapping as run config: as it is when its keys are run-config roots; an asset's or a
    resource's section (`sft_training_pairs: {config: ...}`, `language_model: {model: ...}`) put
    under ops / resources; None when it is not run config."""
    if not isinstance(data, dict) or not data:
        return None
    ops, resources = schema_keys(job, "ops"), schema_keys(job, "resources")
    if set(data) <= set(ROOTS):
        return data
    if not set(data) <= ops | resources:
        return None
    config: dict = {}
    for key, value in data.items():
        whole = isinstance(value, dict) and set(value) <= {"config", "inputs", "outputs"}
        config.setdefault("ops" if key in ops else "resources", {})[key] = value if whole else {"config": value}
    return config


def config_errors(job, config: dict) -> list[str]:
    """dagster's validation of the run config (dagster.validate_run_config), less what the
    placeholders leave open."""
    import dagster as dg

    config, loose, open_ = normalised(config)
    try:
        dg.validate_run_config(job, config)
    except dg.DagsterInvalidConfigError as exc:
        errors = []
        for error in exc.errors:
            path = tuple(getattr(e, "field_name", getattr(e, "list_index", None)) for e in error.stack.entries)
            if error.reason.name == "RUNTIME_TYPE_MISMATCH" and path in loose:
                continue
            if error.reason.name.startswith("MISSING_REQUIRED_FIELD") and path in open_:
                continue
            errors.append(re.sub(r"\s*Expected: .*", "", error.message, flags=re.S).strip())
        return errors
    return []


def yaml_snippets(docs):
    """(where, text, is_block) of every YAML the docs give as run config: yaml blocks, heredocs that
    write a .yaml file, and code spans like `asset: {config: {...}}`."""
    for doc in docs:
        for block in doc.blocks:
            if block.lang in ("yaml", "yml"):
                yield doc.where(block.first), "\n".join(block.lines), True
        for heredoc in all_commands(doc)[1]:
            if heredoc.target.endswith((".yaml", ".yml")):
                yield heredoc.where, heredoc.body, True
        for span in doc.spans:
            if re.match(r"^[a-z_]+:\s*\{", span.text):
                yield span.where, span.text, False


def error_line(where: Where, text: str, error: str) -> Where:
    """The line of a YAML snippet that holds the key an error is about (the snippet's first line
    when none does)."""
    names = re.findall(r'"(\w+)"', error) + re.findall(r"path root(?::\w+)*:(\w+)", error)
    for name in names:
        for i, line in enumerate(text.splitlines()):
            if re.search(rf"(^|[\s{{,]){re.escape(name)}\s*:", line):
                return Where(where.file, where.line + i)
    return where


def test_run_config_in_the_docs_validates_against_the_job(docs, job):
    problems = []
    for where, text, is_block in yaml_snippets(docs):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            if is_block:
                problems.append(f"{where}: not valid YAML: {' '.join(str(exc).split())}")
            continue
        config = as_run_config(job, data)
        if config is None:
            if is_block and isinstance(data, dict):
                problems.append(
                    f"{where}: YAML whose keys ({', '.join(map(str, data))}) are no run-config section or asset"
                )
            continue
        problems += [f"{error_line(where, text, e)}: run config: {e}" for e in config_errors(job, config)]
    report(problems)


def table_scope(job, table) -> tuple[str, ...] | None:
    """What a settings table describes, from the paragraph before it: `X: {config: {...}}` (an
    asset's config, or a section of it) or "the `R` resource" / "resource `R`"."""
    ops, resources = schema_keys(job, "ops"), schema_keys(job, "resources")
    scopes = set()
    for m in re.finditer(r"`([a-z_]+: \{[^`]*\})`", table.context):
        try:
            data = yaml.safe_load(m.group(1))
        except yaml.YAMLError:
            continue
        path = []
        while isinstance(data, dict) and len(data) == 1 and not is_placeholder(data):
            key = next(iter(data))
            path.append(key)
            data = data[key]
        if path and is_placeholder(data):
            if path[0] in ops:
                scopes.add(("ops", *path))
            elif path[0] in ROOTS:
                scopes.add(tuple(path))
    for m in re.finditer(r"`(\w+)` resource\b|\bresource `(\w+)`", table.context):
        name = m.group(1) or m.group(2)
        if name in resources:
            scopes.add(("resources", name, "config"))
    return scopes.pop() if len(scopes) == 1 else None


def test_settings_tables_name_fields_of_what_they_describe(docs, job):
    problems = []
    for doc in docs:
        for table in doc.tables:
            if not table.header or table.header[0].strip("` ").lower() not in ("setting", "field", "key"):
                continue
            scope = table_scope(job, table)
            if scope is None:
                continue
            rows = {}
            for line, cells in table.rows:
                # Only cells that are nothing but names: "`a`", "`a`, `b`"; a note in the cell says
                # the row is about something else.
                if cells and re.fullmatch(r"`[\w.]+`(\s*(,|and|/)\s*`[\w.]+`)*", cells[0]):
                    for name in re.findall(r"`([\w.]+)`", cells[0]):
                        rows[name] = line
            config: dict = {}
            for name in rows:  # `sft.epochs` is config: {sft: {epochs: ...}}
                node = config
                for key in (*scope, *name.split(".")[:-1]):
                    node = node.setdefault(key, {})
                    if not isinstance(node, dict):
                        break
                else:
                    node.setdefault(name.split(".")[-1], "...")
            for error in config_errors(job, config):
                quoted = set(re.findall(r"[\"'](\w+)[\"']", error))
                hit = [n for n in rows if n.split(".")[-1] in quoted]
                problems += [f"{doc.name}:{rows[n]}: `{n}` is not a field of {'.'.join(scope)}" for n in hit]
                if not hit:
                    problems.append(f"{table.where}: the table of {'.'.join(scope)}: {error}")
    report(problems)
