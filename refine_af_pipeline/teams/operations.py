"""The six instruction operations (the Evol-Instruct family) as short rewrite prompts a small chat
model can follow, and the clean-up of what the model writes back."""

from __future__ import annotations

import re

_REPLY = "Reply with the rewritten task only."

# name -> the request; {instruction} is the current instruction. Order is the action index.
OPERATIONS: dict[str, str] = {
    "breadth": ("Write a new task from the same area as the task below, but about a less common topic. "
                "Reply with the new task only.\n\nTask: {instruction}"),
    "add_constraint": ("Rewrite the task below with one extra requirement or limit added to it, such as a length, "
                       f"a format or something to avoid. {_REPLY}\n\nTask: {{instruction}}"),
    "deepen": f"Rewrite the task below so that it asks about its subject in more depth. {_REPLY}\n\nTask: {{instruction}}",
    "concretize": ("Rewrite the task below, replacing its general words with specific details such as names, "
                   f"numbers or places. {_REPLY}\n\nTask: {{instruction}}"),
    "increase_reasoning": ("Rewrite the task below so that answering it takes several explained steps of reasoning. "
                           f"{_REPLY}\n\nTask: {{instruction}}"),
    "complicate_input": ("Rewrite the task below so that it comes with structured input data to work on, such as a "
                         f"short table, list or JSON object written out in the task. {_REPLY}\n\nTask: {{instruction}}"),
}
OPERATION_NAMES: tuple[str, ...] = tuple(OPERATIONS)

# Words of the rewrite prompts that do not belong in a task: the model copied the request.
LEAK_MARKERS = ("rewritten task", "the task below", "reply with", "new task:", "rewrite the task", "#given prompt#",
                "#rewritten prompt#")

_LABEL = re.compile(r"^\s*(?:here is|here's|sure|okay|ok)\b[^\n:]*:\s*", re.IGNORECASE)
_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:rewritten task|new task|task|rewritten)(?:\*\*)?\s*:\s*(?:\*\*)?", re.IGNORECASE)


def rewrite_request(operation: str, instruction: str) -> str:
    """The user turn that asks for `operation` on `instruction`."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown instruction operation {operation!r}; the operations are {', '.join(OPERATION_NAMES)}")
    return OPERATIONS[operation].format(instruction=instruction.strip())


def clean_rewrite(text: str) -> str:
    """The rewritten instruction from the model's reply: without a "Here is ...:" lead-in, a
    "Rewritten task:" label or wrapping quotes; inner lines (a table, a list) are kept."""
    out = _LABEL.sub("", text.strip(), count=1)
    out = _PREFIX.sub("", out, count=1).strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    return "\n".join(line.rstrip() for line in out.splitlines()).strip()
