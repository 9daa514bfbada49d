"""Turning raw model text into instructions and instances. Never raises on model output."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBERED_ITEM = re.compile(r"(?:^|\n)\s*(\d{1,3})\s*[.)]\s*")


@dataclass(frozen=True)
class ParsedInstructions:
    instructions: list[str]
    status: str  # ok | empty | unparseable
    dropped_truncated: bool


_RESTARTED_LIST = re.compile(r"1\s*[.)]\s+\S")


def parse_numbered_continuation(response: str, first_number: int, hit_token_limit: bool) -> ParsedInstructions:
    """Split a continuation of a numbered list ("9. ... 10. ...") into single instructions.

    The response is what the model wrote after the prompt's open number `first_number.`. Items
    start at consecutive numbered lines; an item is the first line of its text: further lines are
    the model answering it (a nested list, an example) or commentary. A small model often restarts
    the numbering instead ("9. 1. A\n2. B"); that list is read from its own "1.". An item whose
    line runs to the end of a response cut at the token limit is dropped: it is probably cut
    mid-sentence.
    """
    body = response.lstrip()
    start = 1 if _RESTARTED_LIST.match(body) else first_number
    text = body if start == 1 else f"{first_number}. " + body
    matches = list(_NUMBERED_ITEM.finditer(text))
    # Numbers must run on consecutively; anything else is text that merely starts with a digit.
    accepted = []
    for match in matches:
        if int(match.group(1)) == start + len(accepted):
            accepted.append(match)
    cleaned, dropped = [], False
    for k, m in enumerate(accepted):
        end = accepted[k + 1].start() if k + 1 < len(accepted) else len(text)
        item = text[m.end() : end].strip()
        line, newline, _ = item.partition("\n")
        if hit_token_limit and not newline and end == len(text):
            dropped = True  # the last line was still being written when generation stopped
            continue
        cleaned.append(" ".join(line.split()))
    cleaned = [c for c in cleaned if c]
    if cleaned:
        return ParsedInstructions(cleaned, "ok", dropped)
    return ParsedInstructions([], "empty" if not response.strip() else "unparseable", dropped)


@dataclass(frozen=True)
class ParsedInstance:
    input: str
    output: str
    status: str  # ok | missing_output | empty_output
    # The output runs to the end of the text (no second "Input:" ended it): if the generation hit
    # its token limit, the output was cut.
    output_runs_to_end: bool = True


_INPUT = re.compile(r"^\s*\**\s*input\s*\**\s*:\s*", re.IGNORECASE | re.MULTILINE)
_OUTPUT = re.compile(r"^\s*\**\s*output\s*\**\s*:\s*", re.IGNORECASE | re.MULTILINE)


def parse_instance(text: str) -> ParsedInstance:
    """Read "Input: ... Output: ..." from a generated instance; `<noinput>` means an empty input."""
    out_match = _OUTPUT.search(text)
    if out_match is None:
        return ParsedInstance("", "", "missing_output")
    in_match = _INPUT.search(text, 0, out_match.start())
    input_text = text[in_match.end() : out_match.start()].strip() if in_match else ""
    output = text[out_match.end() :]
    # A second "Input:" starts another example; keep only the first.
    next_input = _INPUT.search(output)
    if next_input:
        output = output[: next_input.start()]
    runs_to_end = next_input is None
    output = output.strip()
    if input_text.lower().strip("<> .") in {"noinput", "no input", "none", ""}:
        input_text = ""
    if not output:
        return ParsedInstance(input_text, "", "empty_output", runs_to_end)
    return ParsedInstance(input_text, output, "ok", runs_to_end)
