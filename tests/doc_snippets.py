"""What the README and docs/*.md tell a reader to type, read out of the markdown: fenced code blocks,
code spans, the shell commands in them (with the line each starts on), heredocs, and settings tables.

Plain parsing, no checks: tests/test_docs_against_code.py holds each of them against the code.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Where:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Block:
    """A fenced code block; `lines[i]` is line `first + i` of the file."""

    lang: str
    first: int
    lines: list[str]


@dataclass
class Span:
    where: Where
    text: str


@dataclass
class Table:
    """A markdown table: the header's cells, each row's cells with its line, and the paragraph
    just before it (what the table is about), joined into one line."""

    where: Where
    header: list[str]
    rows: list[tuple[int, list[str]]]
    context: str


@dataclass
class Doc:
    path: Path
    name: str
    lines: list[str]
    blocks: list[Block] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    def where(self, line: int) -> Where:
        return Where(self.name, line)


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+.-]*)")


def read_doc(path: Path) -> Doc:
    lines = path.read_text(encoding="utf-8").splitlines()
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    doc = Doc(path, name, lines)
    prose = list(lines)  # the text outside the code blocks, block lines blanked (keeps line numbers)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        doc.blocks.append(Block(lang, i + 2, lines[i + 1 : j]))
        for k in range(i, min(j + 1, len(lines))):
            prose[k] = ""
        i = j + 1
    doc.spans = code_spans(doc, prose)
    doc.tables = tables(doc, prose)
    return doc


def code_spans(doc: Doc, prose: list[str], first_line: int = 1) -> list[Span]:
    """CommonMark code spans: a run of n backticks up to the next run of exactly n, within one
    paragraph (a span may wrap onto the next line). Spans nested in a double-backtick span (an
    error message that quotes a command) are returned too."""
    text = "\n".join(prose)
    starts = [0]
    for line in prose:
        starts.append(starts[-1] + len(line) + 1)

    def line_of(offset: int) -> int:
        lo, hi = 0, len(starts) - 1
        while lo < hi - 1:
            mid = (lo + hi) // 2
            if starts[mid] <= offset:
                lo = mid
            else:
                hi = mid
        return first_line + lo

    spans: list[Span] = []
    i = 0
    while i < len(text):
        if text[i] != "`":
            i += 1
            continue
        n = len(re.match(r"`+", text[i:]).group(0))
        end = re.compile(rf"(?<!`)`{{{n}}}(?!`)").search(text, i + n)
        if end is None or re.search(r"\n[ \t]*\n", text[i + n : end.start()]):
            i += n  # no closing run in this paragraph: literal backticks
            continue
        content = text[i + n : end.start()].replace("\n", " ")
        if content.startswith(" ") and content.endswith(" ") and content.strip():
            content = content[1:-1]
        where = doc.where(line_of(i))
        spans.append(Span(where, content))
        if n > 1 and "`" in content:
            spans.extend(Span(where, s.text) for s in code_spans(doc, [content], where.line))
        i = end.end()
    return spans


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(doc: Doc, prose: list[str]) -> list[Table]:
    found = []
    i = 0
    while i < len(prose):
        if (
            prose[i].lstrip().startswith("|")
            and i + 1 < len(prose)
            and re.match(r"^\s*\|[\s:|-]+\|?\s*$", prose[i + 1])
        ):
            header = _cells(prose[i])
            j = i + 2
            rows = []
            while j < len(prose) and prose[j].lstrip().startswith("|"):
                rows.append((j + 1, _cells(prose[j])))
                j += 1
            # The paragraph before the table: back over blank lines, then up to the previous blank line.
            k = i - 1
            while k >= 0 and not prose[k].strip():
                k -= 1
            end = k
            while k >= 0 and prose[k].strip():
                k -= 1
            context = " ".join(line.strip() for line in prose[k + 1 : end + 1])
            found.append(Table(doc.where(i + 1), header, rows, context))
            i = j
        else:
            i += 1
    return found


# --- shell commands ---------------------------------------------------------------------------

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
# First words that make a line of an unlabelled block, or a code span, a command.
COMMAND_WORDS = {
    "make",
    "dagster",
    "dagster-webserver",
    "dagster-daemon",
    "dagster-graphql",
    "hf",
    "huggingface-cli",
    "python",
    "python3",
    "pytest",
    "ruff",
    "uv",
    "pip",
    "bash",
}
WRAPPERS = {"sudo", "nohup", "time", "exec", "env"}
CONTROL = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
REDIRECT = re.compile(r"^\d*(>>?|<|>&|&>|<&)$")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
PLACEHOLDER = re.compile(r"(?<![<\w])<([A-Za-z][\w .:/-]*)>")


@dataclass
class Command:
    """One simple command: `words` after its leading VAR=value assignments (and wrappers like
    nohup), `assignments` those, `exported` the names an `export` line sets."""

    where: Where
    words: list[str]
    assignments: dict[str, str]
    text: str


@dataclass
class Heredoc:
    where: Where  # the line of the first body line
    target: str  # the file `cat > target <<EOF` writes, or ""
    body: str


def split_words(line: str) -> list[str] | None:
    """shlex words of one shell line, control operators as their own words; None when the line
    does not parse (unbalanced quotes). `<placeholder>` stands for a value, not a redirection."""
    line = PLACEHOLDER.sub(lambda m: "PLACEHOLDER_" + re.sub(r"\W", "_", m.group(1)), line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:
        return None


def commands_of(words: list[str], where: Where, text: str) -> list[Command]:
    commands: list[Command] = []
    current: list[str] = []
    for word in [*words, ";"]:
        if word in CONTROL:
            if current:
                commands.append(_command(current, where, text))
            current = []
        else:
            current.append(word)
    return commands


def _command(words: list[str], where: Where, text: str) -> Command:
    kept, skip = [], False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word == "<<" or REDIRECT.match(word):
            skip = True  # the target or the heredoc delimiter
            if kept and kept[-1].isdigit() and i and words[i - 1] == kept[-1]:
                kept.pop()  # 2>...: the descriptor
        else:
            kept.append(word)
    assignments = {}
    while kept and (kept[0] in WRAPPERS or ASSIGNMENT.match(kept[0])):
        m = ASSIGNMENT.match(kept.pop(0))
        if m:
            assignments[m.group(1)] = m.group(2)
    return Command(where, kept, assignments, text)


def is_command_word(word: str) -> bool:
    return word in COMMAND_WORDS or word.startswith((".venv/bin/", "$(BIN)/"))


def block_commands(doc: Doc, block: Block) -> tuple[list[Command], list[Heredoc]]:
    """The commands of a shell block (every line) or of an unlabelled block (the lines that start
    with a command word); continuation lines joined, heredoc bodies returned apart."""
    if block.lang not in SHELL_LANGS and block.lang != "":
        return [], []
    commands, heredocs = [], []
    i = 0
    while i < len(block.lines):
        number = block.first + i
        line = re.sub(r"^\s*\$ ", "", block.lines[i])
        while line.endswith("\\") and i + 1 < len(block.lines):
            i += 1
            line = line[:-1] + " " + block.lines[i].strip()
        i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            body_start = i
            while i < len(block.lines) and block.lines[i].strip() != heredoc.group(1):
                i += 1
            target = re.search(r">\s*(\S+)", line[: heredoc.start()])
            heredocs.append(
                Heredoc(
                    doc.where(block.first + body_start),
                    target.group(1) if target else "",
                    "\n".join(block.lines[body_start:i]),
                )
            )
            i += 1
        words = split_words(line)
        if not words:
            continue
        if block.lang == "" and not _starts_command(words):
            continue
        commands.extend(commands_of(words, doc.where(number), line.strip()))
    return commands, heredocs


def _starts_command(words: list[str]) -> bool:
    rest = [w for w in words if not ASSIGNMENT.match(w)]
    return bool(rest) and is_command_word(rest[0])


def span_commands(span: Span) -> list[Command]:
    """A code span is a command when it starts with a command word (after VAR=value
    assignments), or is only assignments (`PYTEST_ARGS='-m unit'`)."""
    words = split_words(span.text)
    if not words:
        return []
    if all(ASSIGNMENT.match(w) for w in words):
        return [_command(words, span.where, span.text)]
    if not _starts_command(words):
        return []
    return commands_of(words, span.where, span.text)


def all_commands(doc: Doc) -> tuple[list[Command], list[Heredoc]]:
    commands, heredocs = [], []
    for block in doc.blocks:
        c, h = block_commands(doc, block)
        commands += c
        heredocs += h
    for span in doc.spans:
        commands += span_commands(span)
    return commands, heredocs


def exported_names(doc: Doc) -> list[tuple[Where, str]]:
    """Names set by `export NAME=...` lines in the shell blocks."""
    names = []
    for block in doc.blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for i, line in enumerate(block.lines):
            words = split_words(line) or []
            if words[:1] == ["export"]:
                for word in words[1:]:
                    m = ASSIGNMENT.match(word) or re.match(r"^([A-Za-z_]\w*)$", word)
                    if m:
                        names.append((doc.where(block.first + i), m.group(1)))
    return names
