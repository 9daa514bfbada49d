"""The TeaMs-RL reviewer: code rules, the embedded model's judgement on hand-made pairs, caching."""

import pytest

from refine_af_pipeline.llm.transformers_backend import TransformersModel
from refine_af_pipeline.teams.call_cache import CallCache
from refine_af_pipeline.teams.operations import OPERATION_NAMES, clean_rewrite, rewrite_request
from refine_af_pipeline.teams.reviewer import InformationGainReviewer, rule_zero

TASK = "Write a poem about the sea."
CONSTRAINED = "Write a poem about the sea in exactly four lines, without using the word blue."


@pytest.mark.unit
@pytest.mark.parametrize(
    "after, rule",
    [
        ("", "empty_or_punctuation"),
        ("?!...", "empty_or_punctuation"),
        ("write a poem about the sea", "identical"),
        ("I'm sorry, I cannot help with that.", "refusal"),
        (rewrite_request("add_constraint", TASK), "echo_of_request"),
        ("Rewritten task: Write a poem about the sea", "leaked_prompt_words"),
        ("Please write a poem about the sea.", "near_identical"),
        ("Describe a sunset in exactly three sentences without using the word orange.", "copied_example"),
        ("Write a poem about the sea and the three spiders in the box.", "copied_example"),
        (CONSTRAINED, None),
    ],
)
def test_code_rules(after, rule):
    assert rule_zero(TASK, after) == rule


@pytest.mark.unit
def test_clean_rewrite_keeps_the_first_line_without_lead_ins_or_labels():
    assert clean_rewrite(' Here is the rewritten task: "Write a haiku about rain."') == "Write a haiku about rain."
    assert clean_rewrite("\nRewritten Task: Sort the list: 3, 1, 2.\nAnswer: 1, 2, 3") == "Sort the list: 3, 1, 2."


@pytest.mark.unit
def test_unknown_operation_is_named():
    with pytest.raises(ValueError, match="paraphrase"):
        rewrite_request("paraphrase", TASK)
    assert len(OPERATION_NAMES) == 6


@pytest.fixture(scope="module")
def embedded_reviewer_model(embedded_model_dir):
    from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source

    source = resolve_model_source(str(embedded_model_dir))
    return TransformersModel(load_causal_lm(source, "cpu", None), load_tokenizer(source), source.model_id)


@pytest.mark.slow
def test_a_real_constraint_scores_above_an_echo_or_a_copy(embedded_reviewer_model, tmp_path):
    reviewer = InformationGainReviewer(embedded_reviewer_model, cache=CallCache(tmp_path / "c.sqlite"))
    afters = [CONSTRAINED, rewrite_request("add_constraint", TASK), TASK, "Write a poem about the sea!"]
    added, echo, copy, near_copy = reviewer.review([TASK] * 4, afters)
    assert added.rule is None and 0 < added.p_differs < 1 and added.reward == added.p_differs
    assert (echo.rule, copy.rule, near_copy.rule) == ("echo_of_request", "identical", "identical")
    assert added.reward > max(echo.reward, copy.reward, near_copy.reward)
    assert reviewer.model_calls == 1  # only the pair no rule decided went to the model
    assert reviewer.version.startswith("teams-information-gain/v1:") and ":q-" in reviewer.version


@pytest.mark.slow
def test_judgements_are_cached_across_reviewers(embedded_reviewer_model, tmp_path):
    path = tmp_path / "cache.sqlite"
    first = InformationGainReviewer(embedded_reviewer_model, cache=CallCache(path))
    [a] = first.review([TASK], [CONSTRAINED])
    second = InformationGainReviewer(embedded_reviewer_model, cache=CallCache(path))
    [b] = second.review([TASK], [CONSTRAINED])
    assert (first.model_calls, second.model_calls) == (1, 0)
    assert b.cached and not a.cached and b.p_differs == pytest.approx(a.p_differs)
