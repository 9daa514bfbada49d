"""The offline feedback components: each on hand-made good and bad instances, and the LLM judge's
rating protocol on a scripted model."""

import math

import pytest
import torch
from feedback_fakes import ScriptedCausalLM

from refine_af_pipeline.feedback.components import (
    EmbeddingCoherence,
    LikelihoodNaturalness,
    LLMJudgePreference,
    ReadabilityUnderstandability,
)
from refine_af_pipeline.feedback.setup import EMBEDDED_MINILM, EMBEDDED_MINILM_ID, load_embedder
from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source
from refine_af_pipeline.llm.transformers_backend import TransformersModel

pytestmark = pytest.mark.graph


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    source = resolve_model_source(str(tiny_model_dir))
    return load_causal_lm(source, "cpu", torch.float32), load_tokenizer(source)


def test_llm_judge_score_is_the_probability_weighted_mean_rating(tiny):
    _, tokenizer = tiny
    nine, two = (tokenizer(r, add_special_tokens=False)["input_ids"][0] for r in ("9", "2"))

    def judge_score(logits):
        model = ScriptedCausalLM(len(tokenizer), logits)
        judge = LLMJudgePreference(TransformersModel(model, tokenizer, "scripted-judge"))
        return judge, model, judge.score(["Add the numbers."], ["2 and 3"], ["5"])[0]

    judge, model, high = judge_score({nine: 3.0, two: 1.0})
    # Independent arithmetic: softmax over the single-token ratings, expected value, mapped to [0, 1].
    values = [int(r) for r in judge.ratings]
    weights = [math.exp(3.0) if v == 9 else math.exp(1.0) if v == 2 else 1.0 for v in values]
    expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    assert high == pytest.approx((expected - min(values)) / (max(values) - min(values)), abs=1e-6)
    _, _, low = judge_score({nine: 1.0, two: 3.0})
    assert high > low
    prompt = tokenizer.decode(model.seen[0][0], skip_special_tokens=True)
    assert "Task: Add the numbers.\nInput: 2 and 3\nResponse: 5" in prompt
    assert judge.version == "llm-judge-rating-1-10/v1:scripted-judge"


def test_likelihood_prefers_text_the_model_knows_over_noise(tiny):
    model, tokenizer = tiny
    naturalness = LikelihoodNaturalness(TransformersModel(model, tokenizer, "tiny"))
    # The tiny model was trained on outputs made of its word list; noise is bytes it never saw.
    good = "Quiet river garden market bright"
    bad = "zx#qv@@ 9k!p ~~ Qj%% vv&x"
    scores = naturalness.score(["Describe the river garden."] * 3, ["", "", ""], [good, bad, f"{good} {good}"])
    assert scores[0] > scores[1]
    assert 0.0 < scores[1] < scores[0] <= 1.0
    assert scores[2] > scores[1]  # length-normalised: twice the good text is not punished for length
    assert naturalness.version == "mean-token-likelihood/v1:tiny"


def test_coherence_prefers_an_output_on_the_task():
    embedder = load_embedder(EMBEDDED_MINILM, "cpu")
    coherence = EmbeddingCoherence(embedder, EMBEDDED_MINILM_ID)
    on_topic, off_topic = coherence.score(
        ["List three fruits that are red."] * 2,
        ["", ""],
        ["Strawberries, cherries and red apples.", "The train to Berlin leaves at noon from platform four."],
    )
    assert on_topic > off_topic + 0.2
    assert -1.0 <= off_topic < on_topic <= 1.0
    assert coherence.version == f"embedding-cosine/v1:{EMBEDDED_MINILM_ID}"


def test_readability_prefers_plain_text():
    readability = ReadabilityUnderstandability()
    plain, dense = readability.score(
        ["Explain."] * 2,
        ["", ""],
        [
            "The cat sat on the mat. It was a warm day.",
            "Notwithstanding considerable epistemological ramifications, institutional stakeholders "
            "reconceptualized paradigms.",
        ],
    )
    assert plain > dense
    assert 0.0 <= dense < plain <= 1.0
    assert readability.version == "flesch-reading-ease/v1:textstat-0.7.8"
