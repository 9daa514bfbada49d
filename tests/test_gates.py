"""The instance gate on hand-made instances, the labels a classification instruction names, and
the gate wired into the scorer (cut outputs, labels, penalty)."""

import json

import pytest

from refine_af_pipeline.feedback.gates import GateSettings, InstanceGate
from refine_af_pipeline.feedback.scores import COMPONENTS, DEFAULT_WEIGHTS, FeedbackScorer
from refine_af_pipeline.instructions.labels import is_one_of, named_labels
from refine_af_pipeline.instructions.seeds import builtin_seed_path

pytestmark = pytest.mark.unit


def test_each_gate_on_hand_made_instances():
    gate = InstanceGate()
    assert gate.reason("missing_output", "Do it.", "", "") == "missing_output"
    assert gate.reason("ok", "Do it.", "", "  ") == "empty_output"
    assert (
        gate.reason("ok", "Summarise the text.", "a long text", "A summary that stopped in", cut=True)
        == "output_cut_at_token_limit"
    )
    assert gate.reason("ok", "Is it?", "", "the answer is yes " * 6) == "degenerate_repetition"
    # A near copy of the input (ROUGE-L 0.71) and of the instruction.
    assert (
        gate.reason("ok", "Rewrite it.", "The cat sat on the warm mat today", "The cat sat on a mat")
        == "output_copies_input"
    )
    assert (
        gate.reason("ok", "Write a short poem about the sea at night.", "", "Write a short poem about the sea at night")
        == "output_copies_instruction"
    )
    assert (
        gate.reason(
            "ok", "Label the review as positive or negative.", "Great food.", "It is good", is_classification=True
        )
        == "output_not_a_named_label"
    )
    # Passing instances, and the label gate only where the instruction is a classification task.
    assert (
        gate.reason(
            "ok", "Label the review as positive or negative.", "Great food.", "Positive.", is_classification=True
        )
        is None
    )
    assert gate.reason("ok", "Label the review as positive or negative.", "Great food.", "It is good") is None
    assert gate.reason("ok", "Summarise the text.", "a long text", "A summary.", cut=False) is None
    # A list with a shared frame but different items is not a loop.
    assert gate.reason("ok", "List chores.", "", "1. Buy apples. 2. Buy bread. 3. Buy milk. 4. Walk the dog.") is None


def test_gate_settings_move_the_threshold_and_switch_checks_off():
    loose = InstanceGate(GateSettings(copy_threshold=0.9, gate_cut_outputs=False, gate_labels=False))
    assert loose.reason("ok", "Rewrite it.", "The cat sat on the warm mat today", "The cat sat on a mat") is None
    assert loose.reason("ok", "Summarise.", "text", "A summary that stopped in", cut=True) is None
    assert loose.reason("ok", "Label it as spam or not spam.", "hi", "maybe", is_classification=True) is None


@pytest.mark.parametrize(
    "instruction, labels",
    [
        ("Decide whether the review is positive, negative, or mixed.", ["positive", "negative", "mixed"]),
        ('Is the statement a fact or an opinion? Reply with "fact" or "opinion".', ["fact", "opinion"]),
        ("Identify the language. Choose from: French, Spanish, German.", ["french", "spanish", "german"]),
        ("Label the text message as spam or not spam.", ["spam", "not spam"]),
        ("Write a story about a dragon.", []),
        ("Summarise the paragraph in one sentence.", []),
    ],
)
def test_named_labels(instruction, labels):
    found = named_labels(instruction)
    assert all(label in found for label in labels)
    assert bool(found) == bool(labels)


def test_label_match_ignores_case_article_and_punctuation_but_not_other_words():
    labels = ["positive", "negative", "primary source"]
    assert is_one_of("Positive.", labels) and is_one_of(" NEGATIVE ", labels) and is_one_of("primary", labels)
    assert not is_one_of("The review is positive.", labels)
    assert not is_one_of("neutral", labels) and not is_one_of("", labels)


def test_human_seed_answers_pass_the_label_gate():
    """Every classification seed task of the built-in pool names labels the gate can read, and its
    human-written outputs are among them: the gate does not reject what people write."""
    checked = 0
    for line in builtin_seed_path().read_text().splitlines():
        task = json.loads(line)
        if not task.get("is_classification"):
            continue
        labels = named_labels(task["instruction"])
        assert labels, task["instruction"]
        for instance in task["instances"]:
            assert is_one_of(instance["output"], labels), (task["instruction"], instance["output"], labels)
            checked += 1
    assert checked >= 20


class _Constant:
    def __init__(self, name):
        self.name, self.version = name, "constant"

    def score(self, instructions, inputs, outputs):
        return [0.5] * len(outputs)


def test_scorer_gates_cut_and_off_label_outputs_with_the_configured_penalty():
    scorer = FeedbackScorer(
        components=[_Constant(c) for c in COMPONENTS], gate=InstanceGate(GateSettings(gate_reward=-5.0))
    )
    instructions = ["Summarise it.", "Summarise it.", "Label it as spam or not spam.", "Label it as spam or not spam."]
    generations = [
        "Input: text\nOutput: a summary that",
        "Input: text\nOutput: a summary\nInput: more\nOutput: x",
        "Input: hi\nOutput: hello there",
        "Input: hi\nOutput: Not spam",
    ]
    scored = scorer.score_texts(
        instructions,
        generations,
        hit_token_limit=[True, True, False, False],
        is_classification=[False, False, True, True],
    )
    # The second hit the limit too, but its output was ended by a second example: it is complete.
    assert [s.gate_reason for s in scored] == ["output_cut_at_token_limit", None, "output_not_a_named_label", None]
    assert scored[0].reward == scored[2].reward == -5.0
    # Unstandardised constant components: the reward is 0.5 x the sum of the weights.
    assert scored[1].reward == scored[3].reward == pytest.approx(0.5 * sum(DEFAULT_WEIGHTS.values()))


def test_a_passing_instance_always_earns_more_than_a_gated_one():
    from refine_af_pipeline.feedback.scores import PASSING_MARGIN, ComponentStats

    # Components far below the base model's means: the combined score would be about -16.
    stats = ComponentStats(mean={c: 5.0 for c in COMPONENTS}, std={c: 1.0 for c in COMPONENTS})
    scorer = FeedbackScorer(components=[_Constant(c) for c in COMPONENTS], stats=stats)
    [passing, gated] = scorer.score_texts(["Do it.", "Do it."], ["Input: x\nOutput: a fine answer", "Output:"])
    assert gated.gate_reason == "empty_output" and passing.gate_reason is None
    assert passing.reward == pytest.approx(gated.reward + PASSING_MARGIN)
