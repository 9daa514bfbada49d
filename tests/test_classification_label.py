"""The "Is it classification?" label comes from the model's next-token Yes/No probabilities."""

from types import SimpleNamespace

import pytest
import torch

from refine_af_pipeline.instructions.bootstrap import classify_instructions
from refine_af_pipeline.llm.models import load_tokenizer, resolve_model_source
from refine_af_pipeline.llm.prompts import is_classification_prompt
from refine_af_pipeline.llm.transformers_backend import TransformersModel

pytestmark = pytest.mark.graph


class _ScriptedModel(torch.nn.Module):
    """Puts a fixed logit gap between the Yes and No tokens at the last position."""

    def __init__(self, vocab: int, yes_id: int, no_id: int, gap: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.yes_id, self.no_id, self.gap = vocab, yes_id, no_id, gap
        self.seen = []

    def forward(self, input_ids, attention_mask=None):
        self.seen.append(input_ids)
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.yes_id] = self.gap
        return SimpleNamespace(logits=logits)


def test_label_follows_yes_no_probability(tiny_model_dir):
    tokenizer = load_tokenizer(resolve_model_source(str(tiny_model_dir)))
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer("No", add_special_tokens=False)["input_ids"][0]
    for gap, expected in ((3.0, True), (-3.0, False)):
        model = _ScriptedModel(len(tokenizer), yes, no, gap)
        labels = classify_instructions(
            TransformersModel(model, tokenizer, "scripted"),
            ["Label the review as positive or negative.", "Write a poem about rain."],
        )
        p_yes = torch.sigmoid(torch.tensor(gap)).item()  # softmax over two logits {gap, 0}
        assert [label for label, _ in labels] == [expected, expected]
        assert all(abs(p - p_yes) < 1e-5 for _, p in labels)
    # One batch of two prompts, each ending with its own instruction and the question.
    first, second = (tokenizer.decode(row, skip_special_tokens=True) for row in model.seen[0])
    assert "Task: Label the review as positive or negative.\nIs it classification?" in first
    assert "Task: Write a poem about rain.\nIs it classification?" in second
    assert "Write a poem about rain." not in first


def test_few_shot_prompt_ends_with_the_question():
    prompt = is_classification_prompt("Sort the emails into  spam and not spam.")
    assert prompt.endswith("Task: Sort the emails into spam and not spam.\nIs it classification?")
    assert prompt.count("Is it classification?") == 7
