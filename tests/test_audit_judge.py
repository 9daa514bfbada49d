"""The audit judge: its arithmetic on a scripted model, and its order on hand-made cases with the
real Gemma 3 270M (slow)."""

import pytest

from refine_af_pipeline.feedback.audit import InstructionPMIAudit
from refine_af_pipeline.llm.backend import Provenance, ServedModel


class _Tokenizer:
    bos_token = "<bos>"


class _Scripted(ServedModel):
    """Per-token log-probabilities -1 with the instruction in the context, -2 without."""

    capabilities = frozenset({"continuation_logprobs"})
    tokenizer = _Tokenizer()
    provenance = Provenance("scripted", "0", "scripted-lm")

    def __init__(self):
        self.contexts = []

    def continuation_logprobs(self, contexts, continuations, batch_size=8):
        self.contexts += contexts
        return [[-1.0 if "Instruction:" in c else -2.0] * len(o.split()) for c, o in zip(contexts, continuations)]


@pytest.mark.unit
def test_audit_is_the_mean_per_token_gain_from_the_instruction_and_skips_empty_outputs():
    model = _Scripted()
    audit = InstructionPMIAudit(model)
    scores = audit.score(["Add them.", "Name one."], ["2 and 3", ""], ["five in words", "  "])
    assert scores == [pytest.approx(1.0), None]
    assert audit.version == "pmi-instruction-given-input/v1:scripted-lm"
    # With the instruction and without it, both starting with the model's BOS, input kept in both.
    assert model.contexts == ["<bos>Instruction: Add them.\nInput: 2 and 3\nOutput:", "<bos>Input: 2 and 3\nOutput:"]


# Hand-made: (instruction, input, a correct output, an echo of the input or instruction, another task's answer).
CASES = [
    (
        "Translate the sentence into French.",
        "The cat is sleeping.",
        "Le chat dort.",
        "The cat is sleeping.",
        "The capital of Japan is Tokyo.",
    ),
    ("Give the antonym of the word.", "hot", "cold", "hot", "Paris"),
    ("Add the two numbers.", "12 and 30", "42", "12 and 30", "The sky is blue."),
    ("Write the word in upper case.", "garden", "GARDEN", "garden", "Once upon a time."),
    (
        "Classify the review as positive or negative.",
        "I loved every minute of this film.",
        "positive",
        "I loved every minute of this film.",
        "42",
    ),
    ("Name the capital city of the country.", "Italy", "Rome", "Italy", "She goes to school."),
    (
        "Correct the spelling mistake.",
        "I recieved the letter.",
        "I received the letter.",
        "I recieved the letter.",
        "Blue whales are mammals.",
    ),
    ("What is the plural of the noun?", "mouse", "mice", "mouse", "The meeting is at noon."),
    (
        "Write a one-line summary of the text.",
        "The city council voted on Tuesday to build a new library downtown, which will open in two years.",
        "The council approved a new downtown library.",
        "The city council voted on Tuesday to build a new library downtown, which will open in two years.",
        "cold",
    ),
    ("List three primary colours.", "", "Red, blue and yellow.", "List three primary colours.", "Le chat dort."),
]


@pytest.mark.slow
def test_real_audit_judge_orders_hand_made_cases():
    """The correct answer above the echo and above another task's answer, in most of the 20 comparisons."""
    from refine_af_pipeline.llm.models import EMBEDDED_GEMMA
    from resources import LanguageModelResource

    resource = LanguageModelResource(model=EMBEDDED_GEMMA, device="cpu")
    try:
        audit = InstructionPMIAudit(resource.open_models({"audit": None})["audit"])
        n = len(CASES)
        scores = audit.score(
            [c[0] for c in CASES] * 3,
            [c[1] for c in CASES] * 3,
            [c[2] for c in CASES] + [c[3] for c in CASES] + [c[4] for c in CASES],
        )
    finally:
        resource.close()
    correct, echo, other = scores[:n], scores[n : 2 * n], scores[2 * n :]
    right = sum(c > e for c, e in zip(correct, echo)) + sum(c > o for c, o in zip(correct, other))
    assert right >= 15, (right, list(zip(correct, echo, other)))
