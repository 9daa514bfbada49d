"""The six instruction operations (the Evol-Instruct family) as short rewrite prompts a small chat
model can follow, and the clean-up of what the model writes back.

Each request carries one worked example and the assistant turn starts with "Rewritten task:", so
a 135M model writes a task rather than an answer to it; the rewrite is the first line of the
reply (generation stops there), so structured input goes inline."""

from __future__ import annotations

import re

# name -> (what to do, an example task, its rewrite). Dict order is the action index.
_OPERATIONS: dict[str, tuple[str, str, str]] = {
    "breadth": (
        "Write a new task from the same area as the task, but about a less common topic.",
        "Suggest three names for a new coffee shop.",
        "Suggest three names for a shop that repairs vintage typewriters.",
    ),
    "add_constraint": (
        "Rewrite the task with one extra requirement or limit added, such as a length, a format or something to avoid.",
        "Describe a sunset.",
        "Describe a sunset in exactly three sentences without using the word orange.",
    ),
    "deepen": (
        "Rewrite the task so that it asks about its subject in more depth.",
        "Explain why leaves fall in autumn.",
        "Explain which chemical and hormonal changes make deciduous trees drop their leaves in autumn, and why "
        "evergreens keep theirs.",
    ),
    "concretize": (
        "Rewrite the task, replacing its general words with specific details such as names, numbers or places.",
        "Write a message to a colleague about a meeting.",
        "Write a message to Priya saying that Tuesday's 10 am budget meeting has moved to room 4B.",
    ),
    "increase_reasoning": (
        "Rewrite the task so that answering it takes several explained steps of reasoning.",
        "How many legs do three spiders have?",
        "A box holds three spiders and two beetles; work out step by step how many legs are in the box, showing "
        "each multiplication.",
    ),
    "complicate_input": (
        "Rewrite the task so that it comes with input data to work on, such as a short list, table or JSON object, "
        "written out in the task.",
        "Find the cheapest item.",
        "Find the cheapest item in this list and give its price: apples 2.10, bread 1.75, cheese 4.20, milk 0.99.",
    ),
}
OPERATION_NAMES: tuple[str, ...] = tuple(_OPERATIONS)
OPERATIONS: dict[str, str] = {name: how for name, (how, _, _) in _OPERATIONS.items()}
EXAMPLE_REWRITES: dict[str, str] = {name: rewritten for name, (_, _, rewritten) in _OPERATIONS.items()}
# Words only the worked examples bring: a rewrite with one its instruction lacks took it from an example.
EXAMPLE_WORDS = (
    "typewriter",
    "deciduous",
    "evergreen",
    "priya",
    "room 4b",
    "spider",
    "beetle",
    "apples 2.10",
    "bread 1.75",
    "cheese 4.20",
    "milk 0.99",
)

# The assistant turn starts with this; the model continues it with the rewritten task.
REWRITE_PREFIX = "Rewritten task:"

# Words of the rewrite prompts that do not belong in a rewritten task: the model copied the
# request, or described the task instead of rewriting it.
LEAK_MARKERS = (
    "rewritten task",
    "reply with",
    "new task:",
    "rewrite the task",
    "example task",
    "the task is",
    "the task requires",
    "#given prompt#",
    "#rewritten prompt#",
)

_LABEL = re.compile(r"^\s*(?:here is|here's|sure|okay|ok)\b[^\n:]*:\s*", re.IGNORECASE)
_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:rewritten task|new task|task|rewritten)(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)


def rewrite_request(operation: str, instruction: str) -> str:
    """The user turn that asks for `operation` on `instruction`."""
    if operation not in _OPERATIONS:
        raise ValueError(
            f"unknown instruction operation {operation!r}; the operations are {', '.join(OPERATION_NAMES)}"
        )
    how, example, rewritten = _OPERATIONS[operation]
    task = " ".join(instruction.split())
    return f"{how}\n\nExample task: {example}\n{REWRITE_PREFIX} {rewritten}\n\nTask: {task}"


def clean_rewrite(text: str) -> str:
    """The rewritten instruction from the model's reply: its first non-empty line, without a
    "Here is ...:" lead-in, a "Rewritten task:" label or wrapping quotes."""
    out = _LABEL.sub("", text.strip(), count=1)
    out = _PREFIX.sub("", out, count=1).strip()
    out = next((line.strip() for line in out.splitlines() if line.strip()), "")
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    return out
