"""Teacher-forced log-likelihoods and next-token distributions in padded batches, against a hand
computation: one unpadded forward pass per text and a log-softmax read at each position."""

import math

import pytest
import torch

from refine_af_pipeline.evaluation.tasks import reference_log_likelihood
from refine_af_pipeline.llm.backend import mean_logprob
from refine_af_pipeline.llm.generation import continuation_logprobs, next_token_distribution
from refine_af_pipeline.llm.transformers_backend import TransformersModel
from resources import LanguageModelResource

pytestmark = pytest.mark.graph

CONTEXTS = [
    "Definition: Name the colour.\n\nInput: the sky on a clear day\nOutput:",
    "Explain",
    "Definition: Answer with one word.\n\nInput: a very long input that makes this row the widest of the "
    "batch by far, so the others are padded\nOutput:",
]
CONTINUATIONS = [" blue", " the river and the garden before the market opens", " yes"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer, _, _ = LanguageModelResource(model=str(tiny_model_dir), device="cpu").load()
    return model, tokenizer


def by_hand(model, tokenizer, context: str, continuation: str) -> list[float]:
    a = tokenizer(context, add_special_tokens=False)["input_ids"]
    b = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([a + b])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return [logprobs[p - 1, (a + b)[p]].item() for p in range(len(a), len(a) + len(b)) if p > 0]


def test_continuation_logprobs_equal_a_hand_computation_in_padded_batches(tiny):
    model, tokenizer = tiny
    expected = [by_hand(model, tokenizer, c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    for batch_size in (1, 2, 3):
        got = continuation_logprobs(model, tokenizer, CONTEXTS, CONTINUATIONS, batch_size=batch_size)
        assert [len(g) for g in got] == [len(e) for e in expected]
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=2e-4), batch_size


def test_a_continuation_without_context_skips_its_first_token(tiny):
    model, tokenizer = tiny
    [got] = continuation_logprobs(model, tokenizer, [""], [" the river"])
    n = len(tokenizer(" the river", add_special_tokens=False)["input_ids"])
    assert len(got) == n - 1 and got == pytest.approx(by_hand(model, tokenizer, "", " the river"), abs=2e-4)


def test_reference_log_likelihood_is_the_best_mean_over_references(tiny):
    model, tokenizer = tiny
    prompt = CONTEXTS[0]
    refs = ("blue", "a bright and very clear blue colour")
    means = [mean_logprob(by_hand(model, tokenizer, prompt, " " + r)) for r in refs]
    [got] = reference_log_likelihood(TransformersModel(model, tokenizer, "tiny"), [prompt], [refs], batch_size=2)
    assert got == pytest.approx(max(means), abs=2e-4)
    assert means[0] != pytest.approx(means[1], abs=1e-3)  # the choice of reference matters here
    assert math.isnan(mean_logprob([]))


def test_next_token_distribution_matches_an_unpadded_forward(tiny):
    model, tokenizer = tiny
    candidates = ["Yes", "No"]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in candidates]
    got = next_token_distribution(model, tokenizer, CONTEXTS, candidates, batch_size=3)
    for context, probs in zip(CONTEXTS, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokenizer(context, add_special_tokens=False)["input_ids"]])).logits
        expected = torch.softmax(logits[0, -1, ids].double(), dim=-1).tolist()
        assert probs == pytest.approx(expected, abs=2e-4)


def test_one_prefill_gives_the_same_answers_and_continuation_scores_as_two_passes(tiny):
    from refine_af_pipeline.llm.backend import SamplingParams
    from refine_af_pipeline.llm.generation import generate
    from refine_af_pipeline.llm.prefix_scoring import generate_and_score_continuations

    model, tokenizer = tiny
    prompts = CONTEXTS + ["Definition: Give the opposite.\n\nInput: quiet\nOutput:"]
    continuations = [[" blue", " a clear blue sky"], [" the river"], [" yes", " no", " maybe not"], [" loud"]]
    params = SamplingParams(max_new_tokens=10, do_sample=False)
    for batch_size in (2, 4):
        gens, scores = generate_and_score_continuations(
            model, tokenizer, prompts, continuations, params, batch_size, score_batch_size=3
        )
        assert [g.text for g in gens] == [g.text for g in generate(model, tokenizer, prompts, params, batch_size)]
        for prompt, conts, got in zip(prompts, continuations, scores):
            assert len(got) == len(conts)
            for cont, lp in zip(conts, got):
                assert lp == pytest.approx(by_hand(model, tokenizer, prompt, cont), abs=2e-4), (prompt, cont)


def test_views_of_one_shared_model_match_separately_loaded_models(tiny_model_dir, tmp_path):
    """Base and adapter views over one copy of the weights answer and score like a fresh base
    model and a fresh model with the adapter; merging the adapter changes nothing but speed."""
    from peft import get_peft_model

    from refine_af_pipeline.llm.adapters import merged
    from refine_af_pipeline.training.trainer_setup import lora_config

    resource = LanguageModelResource(model=str(tiny_model_dir), device="cpu")
    base, tokenizer, _, _ = resource.load()
    peft = get_peft_model(resource.load()[0], lora_config(4, 8))
    torch.manual_seed(1)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained-looking adapter: B is zero when it starts
    peft.save_pretrained(tmp_path / "adapter")
    adapted, _, _, _ = resource.load(adapter=str(tmp_path / "adapter"))
    views, _, _, _ = resource.load_variants({"base": None, "tuned": str(tmp_path / "adapter")})
    expected = {
        "base": continuation_logprobs(base, tokenizer, CONTEXTS, CONTINUATIONS),
        "tuned": continuation_logprobs(adapted, tokenizer, CONTEXTS, CONTINUATIONS),
    }
    assert expected["base"][0] != pytest.approx(expected["tuned"][0], abs=1e-3)  # the adapter matters
    for label in ("tuned", "base", "tuned"):  # switching back and forth
        got = continuation_logprobs(views[label], tokenizer, CONTEXTS, CONTINUATIONS)
        for g, e in zip(got, expected[label]):
            assert g == pytest.approx(e, abs=2e-4), label
    with merged(views["tuned"]) as view:
        for g, e in zip(continuation_logprobs(view, tokenizer, CONTEXTS, CONTINUATIONS), expected["tuned"]):
            assert g == pytest.approx(e, abs=2e-4)
    for g, e in zip(continuation_logprobs(views["base"], tokenizer, CONTEXTS, CONTINUATIONS), expected["base"]):
        assert g == pytest.approx(e, abs=2e-4)  # unmerged again: the base weights are as they were


def test_the_shared_prefill_stops_after_the_first_line_and_falls_back_for_a_one_token_prompt(tiny):
    from refine_af_pipeline.llm.backend import SamplingParams
    from refine_af_pipeline.llm.generation import generate
    from refine_af_pipeline.llm.prefix_scoring import generate_and_score_continuations

    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=16, do_sample=False)
    prompts = CONTEXTS[:2]
    continuations = [[" blue"], [" the river"]]
    gens, _ = generate_and_score_continuations(
        model, tokenizer, prompts, continuations, params, 2, stop_after_first_line=True
    )
    assert [g.text for g in gens] == [
        g.text for g in generate(model, tokenizer, prompts, params, 2, stop_after_first_line=True)
    ]
    # A prompt of one token has no prefix to share: the batch is generated and scored apart.
    one_token = tokenizer.decode(tokenizer("Explain", add_special_tokens=False)["input_ids"][:1])
    assert len(tokenizer(one_token, add_special_tokens=False)["input_ids"]) == 1
    gens, scores = generate_and_score_continuations(
        model, tokenizer, [one_token, CONTEXTS[0]], [[" the river"], [" blue"]], params, 2
    )
    assert scores[0][0] == pytest.approx(by_hand(model, tokenizer, one_token, " the river"), abs=2e-4)
    assert scores[1][0] == pytest.approx(by_hand(model, tokenizer, CONTEXTS[0], " blue"), abs=2e-4)
    assert [g.text for g in gens] == [g.text for g in generate(model, tokenizer, [one_token, CONTEXTS[0]], params, 2)]
