"""The paper's judges: a reward model's score is its logit for the (request, output) text it was
trained on; UniEval's score is P(Yes) / (P(Yes) + P(No)) at the evaluator's first answer position."""

import math

import pytest
import torch
from feedback_fakes import ScriptedCausalLM, ScriptedSeq2Seq
from tiny_judges import build_llama_reward_model, build_oasst_reward_model, build_t5_evaluator

from refine_af_pipeline.feedback.judges import RewardModelPreference, UniEvalBoolean, load_evaluator, load_reward_model
from refine_af_pipeline.llm.models import ModelUnavailable, load_tokenizer, resolve_model_source

pytestmark = pytest.mark.graph

INSTRUCTIONS = ["Add the numbers.", "Name a colour.", "Write a short greeting for a friend."]
INPUTS = ["2 and 3", "", ""]
OUTPUTS = ["5", "Blue, the colour of a clear sky at noon.", "Hello!"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(resolve_model_source(str(tiny_model_dir)))


def _one_by_one_logits(model, tokenizer, texts):
    """Each text alone, unpadded: what the batched score must reproduce."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out.append(model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits[0, 0].item())
    return out


def test_reward_model_score_is_its_logit_on_the_chat_formatted_pair(tiny_model_dir, tmp_path):
    path = build_llama_reward_model(tiny_model_dir, tmp_path / "rm")
    model, tokenizer, model_id = load_reward_model(str(path), "cpu")
    preference = RewardModelPreference(model, tokenizer, model_id, batch_size=2)
    assert preference.format == "chat"  # the tokenizer ships a chat template
    texts, pairs = preference.texts(INSTRUCTIONS, INPUTS, OUTPUTS)
    assert pairs is None
    assert "<|im_start|>user\nAdd the numbers.\n2 and 3<|im_end|>" in texts[0]
    assert texts[0].rstrip().endswith("<|im_start|>assistant\n5<|im_end|>")
    scores = preference.score(INSTRUCTIONS, INPUTS, OUTPUTS)  # batches of 2: padding in play
    assert scores == pytest.approx(_one_by_one_logits(model, tokenizer, texts), abs=1e-4)
    # The score follows the model's logit: flipping the head flips every score.
    with torch.no_grad():
        model.score.weight.mul_(-1)
    assert preference.score(INSTRUCTIONS, INPUTS, OUTPUTS) == pytest.approx([-s for s in scores], abs=1e-4)
    assert preference.version == f"reward-model-logit/v1:{path.resolve()}"


def test_oasst_reward_model_loads_without_remote_code_and_reads_the_oasst_layout(tiny_model_dir, tmp_path):
    path = build_oasst_reward_model(tiny_model_dir, tmp_path / "oasst-rm")
    model, tokenizer, model_id = load_reward_model(str(path), "cpu")
    assert model.config.model_type == "gpt_neox_reward_model"
    assert model.out_proj.bias.item() == pytest.approx(0.25)  # the saved head, not a fresh one
    preference = RewardModelPreference(model, tokenizer, model_id, batch_size=2)
    assert preference.format == "oasst"
    texts, _ = preference.texts(INSTRUCTIONS, INPUTS, OUTPUTS)
    assert texts[0] == "<|prompter|>Add the numbers.\n2 and 3<|endoftext|><|assistant|>5<|endoftext|>"
    assert texts[1] == "<|prompter|>Name a colour.<|endoftext|><|assistant|>" + OUTPUTS[1] + "<|endoftext|>"
    # Last-token pooling with padding in the batch equals each text scored alone.
    assert preference.score(INSTRUCTIONS, INPUTS, OUTPUTS) == pytest.approx(
        _one_by_one_logits(model, tokenizer, texts), abs=1e-4
    )


def test_reward_model_pair_format_and_two_label_heads():
    class _TwoLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"num_labels": 2})()

        def forward(self, input_ids, attention_mask=None):
            # Positive-minus-negative logit = the number of attended tokens.
            n = attention_mask.sum(dim=1).float()
            return type("O", (), {"logits": torch.stack([torch.zeros_like(n), n], dim=1)})()

    class _PairTokenizer:
        def __call__(self, first, second, **kwargs):
            self.pairs = list(zip(first, second))
            lengths = [len(a.split()) + len(b.split()) for a, b in self.pairs]
            width = max(lengths)
            mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
            return _Batch(input_ids=torch.zeros_like(mask), attention_mask=mask)

    class _Batch(dict):
        def to(self, device):
            return self

    tok = _PairTokenizer()
    preference = RewardModelPreference(_TwoLabels(), tok, "pair-rm", prompt_format="pair")
    scores = preference.score(["Add the numbers."], ["2 and 3"], ["five"])
    assert tok.pairs == [("Add the numbers.\n2 and 3", "five")]
    assert scores == [pytest.approx(7.0)]
    with pytest.raises(ValueError, match="prompt format"):
        RewardModelPreference(_TwoLabels(), tok, "pair-rm", prompt_format="xml")


def test_unieval_seq2seq_reads_the_first_decoder_position(tokenizer):
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    model = ScriptedSeq2Seq(len(tokenizer), yes, no, gap=2.0, start_id=tokenizer.pad_token_id)
    coherence = UniEvalBoolean("coherence", model, tokenizer, "scripted-t5", batch_size=2)
    scores = coherence.score(INSTRUCTIONS, INPUTS, OUTPUTS)
    sigmoid = 1 / (1 + math.exp(-2.0))  # softmax over {Yes: gap, No: 0}
    assert scores == pytest.approx([sigmoid] * 3, abs=1e-6)
    encoder_ids, decoder_ids = model.seen[0]
    assert decoder_ids.tolist() == [[tokenizer.pad_token_id]] * 2  # the start token only
    first = tokenizer.decode(encoder_ids[0], skip_special_tokens=True)
    assert first == (
        "question: Is this a coherent response that follows from the task? </s> response: 5 "
        "</s> task: Add the numbers.\n2 and 3"
    )
    naturalness = UniEvalBoolean("naturalness", model, tokenizer, "scripted-t5")
    naturalness.score(INSTRUCTIONS[:1], INPUTS[:1], OUTPUTS[:1])
    assert "task:" not in tokenizer.decode(model.seen[-1][0][0], skip_special_tokens=True)


def test_unieval_on_a_t5_equals_unievals_own_formula(tiny_model_dir, tmp_path):
    path = build_t5_evaluator(tiny_model_dir, tmp_path / "t5")
    model, tokenizer, model_id = load_evaluator(str(path), "cpu")
    assert model.config.is_encoder_decoder
    evaluator = UniEvalBoolean("understandability", model, tokenizer, model_id, batch_size=2)
    scores = evaluator.score(INSTRUCTIONS, INPUTS, OUTPUTS)
    # UniEval's way: "No" as the label, so the decoder is fed the start token; softmax over the
    # whole vocabulary at the first position; P(Yes) / (P(Yes) + P(No)).
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    expected = []
    for output in OUTPUTS:
        text = f"question: Is this an understandable response to the task? </s> response: {output}"
        enc = tokenizer(text, return_tensors="pt")
        labels = torch.tensor([[no]])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=enc["input_ids"], labels=labels).logits[0, 0], dim=-1)
        expected.append((probs[yes] / (probs[yes] + probs[no])).item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) > 1  # the texts reach the model


def test_unieval_causal_reads_the_next_token_after_the_question(tokenizer):
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    model = ScriptedCausalLM(len(tokenizer), {yes: 1.5, no: -0.5})
    evaluator = UniEvalBoolean("understandability", model, tokenizer, "scripted-lm")
    assert evaluator.score(INSTRUCTIONS, INPUTS, OUTPUTS) == pytest.approx([1 / (1 + math.exp(-2.0))] * 3, abs=1e-6)
    prompt = tokenizer.decode(model.seen[0][0], skip_special_tokens=False)
    assert prompt.endswith(
        "Response: 5\n\nQuestion: Is this an understandable response to the task? "
        "Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n"
    )
    flipped = UniEvalBoolean(
        "understandability", ScriptedCausalLM(len(tokenizer), {yes: -0.5, no: 1.5}), tokenizer, "scripted-lm"
    )
    assert flipped.score(INSTRUCTIONS[:1], INPUTS[:1], OUTPUTS[:1])[0] < 0.5


def test_unieval_versions_name_the_model_and_the_question():
    a = UniEvalBoolean.version_for("MingZhong/unieval-dialog", "coherence")
    b = UniEvalBoolean.version_for("MingZhong/unieval-dialog", "naturalness")
    assert a.startswith("unieval-boolean/v1:MingZhong/unieval-dialog:q-") and a != b
    with pytest.raises(ValueError, match="no UniEval question for 'preference'"):
        UniEvalBoolean("preference", ScriptedCausalLM(4, {}), None, "x")


def test_missing_judges_fail_with_their_name(tmp_path):
    with pytest.raises(
        ModelUnavailable, match=r"reward model \(tokenizer\) 'no-such-org/no-such-reward-model'.*allow_download"
    ):
        load_reward_model("no-such-org/no-such-reward-model", "cpu")
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_evaluator(str(tmp_path / "no-evaluator-here"), "cpu")
