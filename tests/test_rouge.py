import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from refine_af_pipeline.instructions.rouge import RougeDeduplicator, rouge_l

pytestmark = pytest.mark.unit

_reference = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "Write", "list", "three", "of", "2", "x-y", "it's", "!"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=12), st.lists(st.sampled_from(_WORDS), max_size=12))
def test_rouge_l_equals_rouge_score(a, b):
    target, prediction = " ".join(a), " ".join(b)
    assert rouge_l(target, prediction) == _reference.score(target, prediction)["rougeL"].fmeasure


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_rouge_l_equals_rouge_score_on_any_text(a, b):
    assert rouge_l(a, b) == _reference.score(a, b)["rougeL"].fmeasure


def test_dedup_decisions_on_hand_made_cases():
    dedup = RougeDeduplicator(["Give three tips for staying healthy."])
    near = dedup.consider("Give three tips for staying healthy at work.")
    assert not near.keep and near.max_rouge_l > 0.7
    assert near.most_similar == "Give three tips for staying healthy."
    fresh = dedup.consider("Translate the sentence into French.")
    assert fresh.keep and fresh.max_rouge_l < 0.3
    # A kept instruction joins the pool: its own near-copy is now rejected.
    again = dedup.consider("Translate this sentence into French.")
    assert not again.keep and again.most_similar == "Translate the sentence into French."


def test_exactly_at_threshold_is_kept():
    # 7 of 10 tokens shared in order: F = 0.7, which is not above 0.7.
    base = "a b c d e f g h i j"
    cand = "a b c d e f g x y z"
    assert rouge_l(base, cand) == _reference.score(base, cand)["rougeL"].fmeasure
    dedup = RougeDeduplicator([base])
    decision = dedup.consider(cand)
    assert decision.max_rouge_l == _reference.score(cand, base)["rougeL"].fmeasure
    assert decision.keep == (decision.max_rouge_l <= 0.7)


def test_dedup_matches_reference_on_random_pool():
    rng = random.Random(3)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(80)]
    dedup = RougeDeduplicator()
    ours = [dedup.consider(t).keep for t in texts]
    kept, ref = [], []
    for t in texts:
        best = max((_reference.score(t, k)["rougeL"].fmeasure for k in kept), default=0.0)
        ref.append(best <= 0.7)
        if best <= 0.7:
            kept.append(t)
    assert ours == ref
    assert 0 < sum(ours) < len(ours)


def test_block_boundaries_do_not_change_decisions(monkeypatch):
    import refine_af_pipeline.instructions.rouge as rouge

    rng = random.Random(5)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))) for _ in range(120)]
    whole = [(d.keep, d.max_rouge_l, d.most_similar) for d in RougeDeduplicator(["a cat sat"]).consider_many(texts)]
    monkeypatch.setattr(rouge, "BLOCK", 7)
    blocked = [(d.keep, d.max_rouge_l, d.most_similar) for d in RougeDeduplicator(["a cat sat"]).consider_many(texts)]
    one_by_one = RougeDeduplicator(["a cat sat"])
    single = [(d.keep, d.max_rouge_l, d.most_similar) for d in (one_by_one.consider(t) for t in texts)]
    assert whole == blocked == single
    assert len(one_by_one) == 1 + sum(k for k, _, _ in single)
