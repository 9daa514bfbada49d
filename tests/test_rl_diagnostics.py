import pytest

from refine_af_pipeline.training.rl_diagnostics import mean_repeat_share, repeated_ngram_share, reward_hacking_warnings

pytestmark = pytest.mark.unit


def test_repeated_ngram_share():
    assert repeated_ngram_share("Input: a list of fruits Output: apple, pear") == 0.0
    assert repeated_ngram_share("two words") == 0.0  # fewer words than n
    looped = "the answer is yes " * 10
    assert repeated_ngram_share(looped) > 0.8
    # 6 trigrams, "a b c" occurs twice: 1 of 6 repeats.
    assert repeated_ngram_share("a b c d a b c e") == pytest.approx(1 - 5 / 6)
    assert mean_repeat_share(["a b c a b c", "x y z"]) == pytest.approx((1 - 3 / 4) / 2)


def _log(lengths, repeats, clipped=None):
    clipped = clipped or [0.0] * len(lengths)
    return [dict(completion_length=n, repeat_share=r, clipped_share=c) for n, r, c in zip(lengths, repeats, clipped)]


def test_a_steady_run_has_no_warnings():
    assert reward_hacking_warnings(_log([30, 32, 29, 31, 30, 33], [0.02, 0.01, 0.03, 0.02, 0.02, 0.03]), 48) == []
    assert reward_hacking_warnings(_log([30], [0.9]), 48) == []  # one step: no trend


def test_length_blow_up_and_clipping_are_reported():
    warnings = reward_hacking_warnings(_log([12, 14, 20, 30, 44, 48], [0.0] * 6, [0, 0, 0, 0.2, 0.8, 1.0]), 48)
    assert any("completion length grew" in w for w in warnings)
    assert any("token limit rose" in w for w in warnings)
    # Cut at the limit from the first step on: the limit is short, not a trend.
    assert reward_hacking_warnings(_log([48] * 6, [0.0] * 6, [1.0, 0.6, 0.6, 0.8, 0.8, 0.6]), 48) == []


def test_rising_repetition_is_reported():
    warnings = reward_hacking_warnings(_log([30] * 6, [0.0, 0.02, 0.1, 0.2, 0.3, 0.4]), 48)
    assert len(warnings) == 1 and "repeated 3-gram share" in warnings[0]
