"""The answer labels a classification instruction names, and whether an output is one of them.

"Label the register of the sentence as formal, neutral, or informal." names three labels; an
instance whose output is "The sentence is quite formal in tone" or "neutralish" does not answer
with one of them, and training on it teaches the tuned model to ignore the instruction's answer
format. Labels are read from quoted options ("fact" or "opinion") and from enumerations
("positive, negative, or mixed", "Choose from: French, Spanish, German"). An instruction with no
recognisable list names no labels, and its outputs are not checked.
"""

from __future__ import annotations

import re

# Words after which an enumeration's first item starts ("... the review below is positive, ...").
_CUES = {
    "as",
    "is",
    "are",
    "be",
    "whether",
    "if",
    "into",
    "from",
    "with",
    "of",
    "either",
    "between",
    "answer",
    "reply",
    "respond",
    "label",
    "choose",
    "tag",
    "select",
    "pick",
    "write",
    "say",
    "output",
    "return",
}
_ARTICLES = ("a ", "an ", "the ")
_MAX_ITEM_WORDS = 4
_QUOTED = re.compile(r"\"([^\"]{1,40})\"|“([^”]{1,40})”|(?<![A-Za-z])'([^']{1,40})'(?![A-Za-z])")
_CLAUSES = re.compile(r"[.?!:;]\s+|[.?!:;]$|\n")
# "a, b, or c" / "a or b" / "a, b, c" inside one clause; items are split afterwards.
_OR_LIST = re.compile(r"\s*,?\s+or\s+")


def _normalise(text: str) -> str:
    text = " ".join(text.lower().replace("_", " ").split()).strip(" \"'“”‘’.,!?;:()[]*`")
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article) :]
    return text


def _enumerations(clause: str) -> list[list[str]]:
    """Comma/or-separated lists in a clause, each item cut to a few words."""
    parts = [p.strip() for p in re.split(r",\s*(?:or\s+|and\s+)?|\s+or\s+", clause) if p.strip()]
    uses_or = _OR_LIST.search(clause) is not None
    if len(parts) < 2 or (not uses_or and len(parts) < 3):
        return []
    rest = parts[1:]
    # The last item may run on ("a secondary source for studying the war"): keep its first words.
    rest[-1] = " ".join(rest[-1].split()[:_MAX_ITEM_WORDS])
    if any(len(p.split()) > _MAX_ITEM_WORDS for p in rest):
        return []
    # The first item carries the clause's beginning: keep what follows the last cue word, at most
    # one word more than the longest other item (an article).
    words = parts[0].split()
    cut = max((k + 1 for k, w in enumerate(words) if w.lower().strip(",:") in _CUES), default=0)
    longest = max(len(p.split()) for p in rest)
    first = words[cut:][-(longest + 1) :] if words[cut:] else []
    if not first:
        return []
    return [[" ".join(first), *rest]]


def named_labels(instruction: str) -> list[str]:
    """The labels `instruction` names (normalised: lower case, no article or surrounding
    punctuation), in order of appearance, or [] when it names none."""
    labels: list[str] = []
    quoted = [next(g for g in m.groups() if g) for m in _QUOTED.finditer(instruction)]
    if len(quoted) >= 2:
        labels += quoted
    for clause in _CLAUSES.split(instruction):
        for items in _enumerations(clause.strip()):
            labels += items
    seen, out = set(), []
    for label in (_normalise(x) for x in labels):
        if label and label not in seen:
            seen.add(label)
            out.append(label)
    return out


def is_one_of(output: str, labels: list[str]) -> bool:
    """True when `output` is one of `labels` (or a run of words inside one: "primary" for "primary
    source"); normalised like the labels, so case, an article and end punctuation do not matter."""
    answer = _normalise(output)
    if not answer:
        return False
    padded = f" {answer} "
    return any(answer == label or padded in f" {label} " for label in labels)
