"""The instance gate: the checks an instance must pass before its scores count, shared by the RL
reward and by every branch's filter, so a policy cannot earn reward for an instance the filter
would drop and no branch trains on an instance another branch would reject.

A gated instance gets the fixed `gate_reward` instead of its combined score and is never used for
SFT. The checks, in the order the first failing one is recorded as `gate_reason`:

- the parser's status (missing_output, empty_output);
- output_cut_at_token_limit: the generation stopped at max_new_tokens while the output was still
  being written (an output ended by a second "Input:" is complete);
- degenerate_repetition: half or more of the output's word 3-grams repeat earlier ones (a loop);
- output_copies_input / output_copies_instruction: ROUGE-L F of the output with the input or with
  the instruction at or above `copy_threshold` (an echo is not an answer);
- output_not_a_named_label: a classification instruction names its labels and the output is
  none of them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..instructions.labels import is_one_of, named_labels
from ..instructions.rouge import rouge_l
from ..settings_types import Probability
from ..training.rl_diagnostics import repeated_ngram_share

GATE_REASONS = (
    "missing_output",
    "empty_output",
    "output_cut_at_token_limit",
    "degenerate_repetition",
    "output_copies_input",
    "output_copies_instruction",
    "output_not_a_named_label",
)
# An output whose word 3-grams are at least this share repeats of earlier ones is a loop, not an
# answer: the likelihood-based naturalness rewards loops (a repeated phrase is very likely under
# the model). Ordinary outputs (lists included) stay well below a half.
DEGENERATE_REPEAT_SHARE = 0.5
DEFAULT_GATE_REWARD = -3.0


class GateSettings(BaseModel):
    """Settings of the instance gate (on the feedback_scorer resource: one gate for the reward and
    for every branch's filter)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gate_reward: float = Field(
        DEFAULT_GATE_REWARD,
        description=(
            "reward of a gated instance, in standardised reward units; a passing instance earns at least 0.1 more "
            "(its combined score is floored there), so passing the gate always pays"
        ),
    )
    copy_threshold: Probability = Field(
        0.7,
        description=(
            "ROUGE-L F of the output with its input or its instruction at or above which it counts as a copy "
            "(the de-duplication threshold; 4 of the 175 human seed instances, edits such as grammar fixes, reach it)"
        ),
    )
    gate_cut_outputs: bool = Field(True, description="gate outputs cut at the token limit")
    gate_labels: bool = Field(
        True, description="gate classification outputs that are none of the labels the instruction names"
    )


class InstanceGate:
    def __init__(self, settings: GateSettings | None = None):
        self.settings = settings or GateSettings()

    @property
    def reward(self) -> float:
        return self.settings.gate_reward

    def reason(
        self,
        parse_status: str,
        instruction: str,
        input_text: str,
        output: str,
        cut: bool = False,
        is_classification: bool = False,
    ) -> str | None:
        """Why the instance is gated, or None when it passes. `cut`: the output ran to the end of a
        generation that hit its token limit."""
        s = self.settings
        if parse_status != "ok":
            return parse_status
        if not output.strip():
            return "empty_output"
        if cut and s.gate_cut_outputs:
            return "output_cut_at_token_limit"
        if repeated_ngram_share(output) >= DEGENERATE_REPEAT_SHARE:
            return "degenerate_repetition"
        if input_text.strip() and rouge_l(input_text, output) >= s.copy_threshold:
            return "output_copies_input"
        if rouge_l(instruction, output) >= s.copy_threshold:
            return "output_copies_instruction"
        if is_classification and s.gate_labels:
            labels = named_labels(instruction)
            if labels and not is_one_of(output, labels):
                return "output_not_a_named_label"
        return None
