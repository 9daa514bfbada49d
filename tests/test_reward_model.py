"""The learned reward: its preference pairs, its fit on a toy set where the answer is known, saving and loading."""

import numpy as np
import pytest

from refine_af_pipeline.feedback.reward_model import (
    EmbeddingRewardModel,
    PreferencePair,
    features,
    fit_bradley_terry,
    length_baseline,
    pairwise_accuracy,
    preference_pairs,
)

pytestmark = pytest.mark.unit


class _ToyEmbedder:
    """Each text is a unit vector fixed by its first word: "good ..." points along the request
    ("task ..."), "bad ..." at right angles; every other word is noise."""

    def __init__(self, dim: int = 8):
        self.dim = dim

    def encode(self, texts, normalize_embeddings=True):
        out = []
        for t in texts:
            rng = np.random.default_rng(abs(hash(t)) % (2**32))
            v = 0.05 * rng.normal(size=self.dim)
            first = t.split()[0] if t.split() else ""
            v[0 if first in ("task", "good") else 1] += 1.0
            out.append(v / np.linalg.norm(v))
        return np.array(out)


def test_pairs_hold_every_kind_of_negative_with_the_human_output_preferred():
    tasks = [
        dict(instruction_id="s1", instruction="Add the numbers.", input="2 and 3", output="The sum is 5 here"),
        dict(instruction_id="s2", instruction="Name a colour.", input="", output="Blue"),
    ]
    pairs = preference_pairs(tasks, {"s1": "I like numbers", "s2": "Blue"}, seed=0)
    kinds = {(p.instruction_id, p.kind) for p in pairs}
    assert kinds == {
        ("s1", "base_model"),
        ("s1", "echo"),
        ("s1", "other_task"),
        ("s1", "cut"),
        ("s2", "echo"),
        ("s2", "other_task"),
    }  # s2: the base model wrote the human answer; too short to cut
    by = {(p.instruction_id, p.kind): p for p in pairs}
    assert by[("s1", "echo")].rejected == "2 and 3" and by[("s2", "echo")].rejected == "Name a colour."
    assert by[("s1", "cut")].rejected == "The sum" and by[("s1", "other_task")].rejected == "Blue"
    assert all(p.preferred == {"s1": "The sum is 5 here", "s2": "Blue"}[p.instruction_id] for p in pairs)


def test_fit_recovers_a_known_preference_where_length_says_nothing():
    embedder = _ToyEmbedder()
    rng = np.random.default_rng(3)
    n = 60
    instructions = [f"task number {k}" for k in range(n)]
    # Good outputs point along their request, bad ones do not; lengths are drawn independently.
    good = [" ".join(["good"] + ["word"] * int(rng.integers(0, 8)) + [str(k)]) for k in range(n)]
    bad = [" ".join(["bad"] + ["word"] * int(rng.integers(0, 8)) + [str(k)]) for k in range(n)]
    phi_good, phi_bad = (features(embedder, instructions, [""] * n, o) for o in (good, bad))
    w = fit_bradley_terry(phi_good[:40], phi_bad[:40])
    model = EmbeddingRewardModel(embedder, w, "toy")
    a = model.score(instructions[40:], [""] * 20, good[40:])
    b = model.score(instructions[40:], [""] * 20, bad[40:])
    assert pairwise_accuracy(a, b) == 1.0
    train = [PreferencePair(str(k), instructions[k], "", good[k], bad[k], "base_model") for k in range(40)]
    sign = length_baseline(train)
    length = pairwise_accuracy([sign * len(x.split()) for x in good[40:]], [sign * len(x.split()) for x in bad[40:]])
    assert length < 0.8


def test_saved_model_scores_the_same_after_loading(tmp_path):
    embedder = _ToyEmbedder()
    model = EmbeddingRewardModel(embedder, np.linspace(-1, 1, 17), "toy", "run-1")
    loaded = EmbeddingRewardModel.load(model.save(tmp_path / "rm"), embedder)
    assert loaded.version == model.version == "bradley-terry-embedding/v1:toy@run-1"
    texts = (["task a", "task b"], ["", ""], ["good x", "bad y"])
    assert loaded.score(*texts) == pytest.approx(model.score(*texts))
    with pytest.raises(FileNotFoundError, match="materialize reward_model again"):
        EmbeddingRewardModel.load(tmp_path / "nothing", embedder)


def test_too_few_pairs_is_an_error():
    with pytest.raises(ValueError, match="too few"):
        fit_bradley_terry(np.ones((3, 4)), np.zeros((3, 4)))
