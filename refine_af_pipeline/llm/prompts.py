"""Prompt texts for every stage. Kept in one place so a run can record exactly what it asked."""

from __future__ import annotations

from collections.abc import Sequence

BOOTSTRAP_HEADER = "Come up with a series of tasks:"
BOOTSTRAP_CLASSIFICATION_HEADER = (
    "Come up with a series of classification tasks. Try to specify the possible output labels when possible."
)


def bootstrap_prompt(example_instructions: Sequence[str], classification: bool = False) -> str:
    """The Self-Instruct bootstrap prompt: numbered examples, and the next number left open.

    The model continues the list; `bootstrap_continuation_prefix` gives the number it starts with.
    """
    header = BOOTSTRAP_CLASSIFICATION_HEADER if classification else BOOTSTRAP_HEADER
    lines = [header]
    for k, instruction in enumerate(example_instructions, start=1):
        # Collapse internal whitespace so one example is one numbered line.
        lines.append(f"{k}. {' '.join(instruction.split())}")
    return "\n".join(lines) + "\n"


def bootstrap_continuation_prefix(n_examples: int) -> str:
    return f"{n_examples + 1}."


INSTANCE_REQUEST = (
    "Write one example for the task below: an input for it (write <noinput> if the task needs no "
    "input) and the correct output for that input.\n"
    "Answer in exactly this form:\nInput: <the input>\nOutput: <the output>\n\n"
    "Task: {instruction}"
)


# The assistant turn starts with this, so even a 135M model answers in the parseable layout.
INSTANCE_PREFIX = "Input:"


def instance_prompt(instruction: str) -> str:
    """The request for one input/output instance of an instruction (base model and RL policy)."""
    return INSTANCE_REQUEST.format(instruction=" ".join(instruction.split()))


JUDGE_REQUEST = (
    "Rate how well the response carries out the task, on a scale from 1 (useless) to 10 (perfect). "
    "Answer with the number only.\n\nTask: {instruction}\n{input_block}Response: {output}"
)


def judge_prompt(instruction: str, input_text: str, output: str) -> str:
    input_block = f"Input: {input_text}\n" if input_text else ""
    return JUDGE_REQUEST.format(instruction=instruction, input_block=input_block, output=output)


# UniEval (Zhong et al., 2022) asks an evaluator one Boolean question per dimension; the score is
# P(Yes) / (P(Yes) + P(No)). These questions name our setting (a task and one response to it); the
# released UniEval-dialog evaluator was trained on dialogue wording, so it transfers, not matches.
UNIEVAL_QUESTIONS = {
    "naturalness": "Is this a natural and fluent response, as a person would write it?",
    "coherence": "Is this a coherent response that follows from the task?",
    "understandability": "Is this an understandable response to the task?",
}
# Dimensions whose question is about the response given its task: the task goes into the input.
UNIEVAL_NEEDS_TASK = {"coherence"}


def unieval_seq2seq_input(dimension: str, request: str, output: str) -> str:
    """UniEval's own layout for its T5 evaluator: "question: ... </s> response: ... </s> task: ..."."""
    text = f"question: {UNIEVAL_QUESTIONS[dimension]} </s> response: {output}"
    return text + (f" </s> task: {request}" if dimension in UNIEVAL_NEEDS_TASK else "")


def unieval_chat_question(dimension: str, request: str, output: str) -> str:
    """The same question to a chat LM; the question comes last so the next token is the answer."""
    task = f"Task: {request}\n" if dimension in UNIEVAL_NEEDS_TASK else ""
    return f"{task}Response: {output}\n\nQuestion: {UNIEVAL_QUESTIONS[dimension]} Answer Yes or No."


CLASSIFICATION_QUESTION_EXAMPLES = (
    ("Decide whether the review below is positive or negative.", "Yes"),
    ("Suggest three names for a bakery that sells only bread.", "No"),
    ("Is this sentence written in the passive or the active voice?", "Yes"),
    ("Explain why the sky looks blue during the day.", "No"),
    ("Label each email as spam or not spam.", "Yes"),
    ("Rewrite the paragraph so that a ten-year-old can follow it.", "No"),
)


def is_classification_prompt(instruction: str) -> str:
    """Few-shot "Is it classification?" prompt; the answer token is Yes or No."""
    lines = ["Can the following task be regarded as a classification task with finite output labels?", ""]
    for example, answer in CLASSIFICATION_QUESTION_EXAMPLES:
        lines += [f"Task: {example}", f"Is it classification? {answer}", ""]
    lines += [f"Task: {' '.join(instruction.split())}", "Is it classification?"]
    return "\n".join(lines)


def sft_prompt(instruction: str, input_text: str) -> str:
    """Alpaca-style layout: instruction, optional input, then the response section to complete."""
    parts = [f"### Instruction:\n{instruction.strip()}\n"]
    if input_text.strip():
        parts.append(f"### Input:\n{input_text.strip()}\n")
    parts.append("### Response:\n")
    return "\n".join(parts)


def evaluation_prompt(definition: str, input_text: str) -> str:
    """Zero-shot prompt in the Super-NaturalInstructions style: definition, input, then Output:."""
    return f"Definition: {definition.strip()}\n\nInput: {input_text.strip()}\nOutput:"
