"""ROUGE-L F-measure with rouge-score's exact tokenizer and formula, and greedy de-duplication.

Tokens are mapped to integer ids once and the LCS is computed by rapidfuzz (C++), which is much
faster than rouge-score's pure-Python table; the F-measure uses the same float operations as
rouge_score.scoring so decisions at the threshold are identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rapidfuzz.distance import LCSseq
from rouge_score.tokenizers import DefaultTokenizer

DEFAULT_THRESHOLD = 0.7

_tokenizer = DefaultTokenizer(use_stemmer=False)


def rouge_tokens(text: str) -> list[str]:
    return _tokenizer.tokenize(text)


def f_measure(lcs: int, n_target: int, n_prediction: int) -> float:
    # Same arithmetic as rouge_score.rouge_scorer._score_lcs + scoring.fmeasure.
    if n_target == 0 or n_prediction == 0:
        return 0.0
    precision = lcs / n_prediction
    recall = lcs / n_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l(target: str, prediction: str) -> float:
    a, b = rouge_tokens(target), rouge_tokens(prediction)
    return f_measure(LCSseq.similarity(a, b), len(a), len(b)) if a and b else 0.0


@dataclass(frozen=True)
class DedupDecision:
    keep: bool
    max_rouge_l: float
    most_similar: str | None


class RougeDeduplicator:
    """A growing pool; `consider` scores a candidate against it and adds it when kept."""

    def __init__(self, pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        self._vocab: dict[str, int] = {}
        self._texts: list[str] = []
        self._ids: list[list[int]] = []
        for text in pool:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    def _encode(self, text: str) -> list[int]:
        return [self._vocab.setdefault(tok, len(self._vocab)) for tok in rouge_tokens(text)]

    def add(self, text: str) -> None:
        self._texts.append(text)
        self._ids.append(self._encode(text))

    def max_score(self, candidate: str) -> tuple[float, str | None]:
        cand = self._encode(candidate)
        n = len(cand)
        best, best_text = 0.0, None
        if n == 0:
            return best, best_text
        for text, ids in zip(self._texts, self._ids):
            m = len(ids)
            # F <= 2*min(n,m)/(n+m): skip pairs that cannot beat the best found so far.
            if m == 0 or 2 * min(n, m) / (n + m) <= best:
                continue
            score = f_measure(LCSseq.similarity(cand, ids), n, m)
            if score > best:
                best, best_text = score, text
        return best, best_text

    def consider(self, candidate: str) -> DedupDecision:
        score, similar = self.max_score(candidate)
        keep = score <= self.threshold
        if keep:
            self.add(candidate)
        return DedupDecision(keep, score, similar)
