"""Self-Instruct's heuristic instruction filters. Each rejection carries a reason code."""

from __future__ import annotations

import re
import string

MIN_WORDS_EXCLUSIVE = 3  # "3 words or fewer" is rejected
MAX_WORDS = 150

# Tasks a text-only model cannot carry out (Self-Instruct's list, plus media words).
BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)
# "1. ...", "2) ...": the small model opened a nested list inside one item. Measured on two demo runs,
# 8 such fragments were kept ("1. 1. 2. 2. 3. 3. ...", "2. Use an analogy: ..."). A number used as a
# word ("5 tips for ...") has no list marker and passes.
_LIST_MARKER_RE = re.compile(r"\d+\s*[.)](\s|$)")


def blacklisted_word(instruction: str) -> str | None:
    match = _BLACKLIST_RE.search(instruction)
    return match.group(1).lower() if match else None


def rejection_reason(instruction: str) -> str | None:
    """None when the instruction passes every filter, else a short reason code."""
    text = instruction.strip()
    if not text:
        return "empty"
    n_words = len(text.split())
    if n_words <= MIN_WORDS_EXCLUSIVE:
        return "too_short"
    if n_words > MAX_WORDS:
        return "too_long"
    word = blacklisted_word(text)
    if word is not None:
        return f"blacklisted:{word}"
    if text.lower().startswith("write a program"):
        return "starts_with_write_a_program"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "starts_with_non_ascii"
    if _LIST_MARKER_RE.match(text):
        return "starts_with_list_number"
    return None
