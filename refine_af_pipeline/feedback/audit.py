"""The audit judge: a model the policy never trained against (Gemma 3 270M by default, a base
model from another family), read as the pointwise mutual information of the output with the
instruction, given the input.

A base model's raw likelihood of an output prefers copying the input (a copy is very likely after
the text it copies) and short, generic text. So the audit reads how much the instruction raises
the output's likelihood over the input alone:

    audit = mean over the output's tokens of
            log p(token | instruction, input, earlier tokens) - log p(token | input, earlier tokens)

An echo of the input is as likely with the instruction as without it (about 0); another task's
fluent answer is not made likelier by this instruction (about 0 or below); an answer that does
what the instruction asks is (above 0). The audit scores outputs only; gated instances (no output)
have none.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..llm.backend import ServedModel

METHOD = "pmi-instruction-given-input/v1"


def _prompt(bos: str, instruction: str | None, input_text: str) -> str:
    parts = [f"Instruction: {instruction.strip()}"] if instruction is not None else []
    if input_text.strip():
        parts.append(f"Input: {input_text.strip()}")
    return bos + "\n".join(parts + ["Output:"])


class InstructionPMIAudit:
    name = "audit"

    def __init__(self, model: ServedModel, batch_size: int = 8):
        model.require("continuation_logprobs", "the audit judge (pointwise mutual information)")
        self.model, self.batch_size = model, batch_size
        # Gemma reads garbage without its BOS token; the contexts are tokenized without special tokens.
        self.bos = model.tokenizer.bos_token or ""
        self.version = f"{METHOD}:{model.provenance.served_model}"

    def score(self, instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> list[float | None]:
        rows = [k for k, o in enumerate(outputs) if o and o.strip()]
        if not rows:
            return [None] * len(outputs)
        continuations = [" " + outputs[k].strip() for k in rows]
        with_instruction = self.model.continuation_logprobs(
            [_prompt(self.bos, instructions[k], inputs[k]) for k in rows], continuations, self.batch_size
        )
        without = self.model.continuation_logprobs(
            [_prompt(self.bos, None, inputs[k]) for k in rows], continuations, self.batch_size
        )
        scores: list[float | None] = [None] * len(outputs)
        for k, a, b in zip(rows, with_instruction, without):
            if a and len(a) == len(b):
                scores[k] = sum(x - y for x, y in zip(a, b)) / len(a)
        return scores
