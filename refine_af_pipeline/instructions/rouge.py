"""ROUGE-L F-measure with rouge-score's exact tokenizer and formula, and greedy de-duplication.

Each instruction is tokenized once with rouge-score's tokenizer, its tokens mapped to integer ids
and the ids to one Unicode character each, so an LCS over tokens becomes an LCS over a short
string. rapidfuzz computes whole blocks of those LCS lengths in C++ on every core (process.cdist),
instead of rouge-score's pure-Python table per pair; the F-measure is then computed with the same
float64 operations as rouge_score.scoring.fmeasure, so decisions at the threshold are identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

# rouge-score's own tokenizer function; DefaultTokenizer(use_stemmer=False) only wraps it, and its
# module imports nltk (for the stemmer we do not use), which costs ~5 s in every step process.
from rouge_score.tokenize import tokenize as _rouge_tokenize

DEFAULT_THRESHOLD = 0.7
BLOCK = 256  # candidates scored together; bounds memory at BLOCK x pool size


def rouge_tokens(text: str) -> list[str]:
    return _rouge_tokenize(text, None)


def f_measure(lcs: int, n_target: int, n_prediction: int) -> float:
    # Same arithmetic as rouge_score.rouge_scorer._score_lcs + scoring.fmeasure.
    if n_target == 0 or n_prediction == 0:
        return 0.0
    precision = lcs / n_prediction
    recall = lcs / n_target
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def f_measure_matrix(lcs: np.ndarray, n_rows: np.ndarray, n_cols: np.ndarray) -> np.ndarray:
    """f_measure for a matrix of LCS lengths; identical float64 operations, element by element."""
    lcs = lcs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / n_cols[None, :]
        recall = lcs / n_rows[:, None]
        total = precision + recall
        f = 2 * precision * recall / total
    return np.where((total > 0) & (n_rows[:, None] > 0) & (n_cols[None, :] > 0), f, 0.0)


def rouge_l(target: str, prediction: str) -> float:
    a, b = rouge_tokens(target), rouge_tokens(prediction)
    return f_measure(LCSseq.similarity(a, b), len(a), len(b)) if a and b else 0.0


@dataclass(frozen=True)
class DedupDecision:
    keep: bool
    max_rouge_l: float
    most_similar: str | None


class RougeDeduplicator:
    """A growing pool. `consider_many` decides candidates in order, exactly as scoring each one
    against the pool plus every candidate kept before it, and adds the kept ones."""

    def __init__(self, pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD, workers: int = -1):
        self.threshold = threshold
        self.workers = workers
        self._vocab: dict[str, int] = {}
        self._texts: list[str] = []
        self._keys: list[str] = []
        self._lens = np.zeros(0, dtype=np.float64)
        for text in pool:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    def _key(self, text: str) -> str:
        chars = []
        for tok in rouge_tokens(text):
            code = self._vocab.setdefault(tok, len(self._vocab)) + 1
            chars.append(chr(code + 0x800 if code >= 0xD800 else code))  # skip the surrogate range
        return "".join(chars)

    def add(self, text: str) -> None:
        self._extend([text], [self._key(text)])

    def _extend(self, texts: Sequence[str], keys: Sequence[str]) -> None:
        self._texts.extend(texts)
        self._keys.extend(keys)
        self._lens = np.concatenate([self._lens, np.array([len(k) for k in keys], dtype=np.float64)])

    def _scores(
        self, rows: Sequence[str], row_lens: np.ndarray, cols: Sequence[str], col_lens: np.ndarray
    ) -> np.ndarray:
        if not rows or not cols:
            return np.zeros((len(rows), len(cols)))
        lcs = process.cdist(rows, cols, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)
        return f_measure_matrix(lcs, row_lens, col_lens)

    def max_score(self, candidate: str) -> tuple[float, str | None]:
        """Best ROUGE-L of `candidate` against the pool (the pool is not changed)."""
        key = self._key(candidate)
        scores = self._scores([key], np.array([len(key)], dtype=np.float64), self._keys, self._lens)[0]
        if scores.size == 0 or scores.max() <= 0.0:
            return 0.0, None
        best = int(np.argmax(scores))
        return float(scores[best]), self._texts[best]

    def consider(self, candidate: str) -> DedupDecision:
        return self.consider_many([candidate])[0]

    def consider_many(self, candidates: Sequence[str]) -> list[DedupDecision]:
        decisions: list[DedupDecision] = []
        for start in range(0, len(candidates), BLOCK):
            decisions.extend(self._consider_block(list(candidates[start : start + BLOCK])))
        return decisions

    def _consider_block(self, texts: list[str]) -> list[DedupDecision]:
        keys = [self._key(t) for t in texts]
        lens = np.array([len(k) for k in keys], dtype=np.float64)
        # Against the pool as it was before this block: one C++ call for the whole block.
        vs_pool = self._scores(keys, lens, self._keys, self._lens)
        pool_best = vs_pool.max(axis=1) if vs_pool.shape[1] else np.zeros(len(keys))
        pool_arg = vs_pool.argmax(axis=1) if vs_pool.shape[1] else np.zeros(len(keys), dtype=int)
        # Against earlier candidates of the same block, which count only once kept.
        within = self._scores(keys, lens, keys, lens)
        kept_idx: list[int] = []
        decisions = []
        for i in range(len(texts)):
            best, similar = float(pool_best[i]), (self._texts[int(pool_arg[i])] if pool_best[i] > 0 else None)
            if kept_idx:
                row = within[i, kept_idx]
                j = int(np.argmax(row))
                # Strictly greater: on a tie the pool's (older) instruction stays the most similar.
                if row[j] > best:
                    best, similar = float(row[j]), texts[kept_idx[j]]
            keep = best <= self.threshold
            if keep:
                kept_idx.append(i)
            decisions.append(DedupDecision(keep, best, similar))
        self._extend([texts[i] for i in kept_idx], [keys[i] for i in kept_idx])
        return decisions
