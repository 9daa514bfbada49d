"""ROUGE-L de-duplication: the Self-Instruct reference, the Alpaca approach and ours, side by side.

    python benchmarks/dedup.py            # N = 1K, 2K, 5K (+ ours at 10K, 50K)
    python benchmarks/dedup.py --quick    # N up to 2K, 50K skipped (about 4 minutes: the reference is slow)

Every (method, N) runs in a fresh process, so its peak resident memory is its own. The last line is
`dedup: identical=yes|no speedup_vs_selfinstruct_5k=<x> ours_50k_s=<s>` (with --quick the ratio is
at 2K and ours_50k_s=skipped).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import time
from collections import defaultdict
from functools import partial
from importlib import resources

from rouge_score import rouge_scorer

from refine_af_pipeline.instructions.rouge import RougeDeduplicator

THRESHOLD = 0.7

FILLERS = ["please", "carefully", "briefly", "also", "clearly", "then", "now", "really", "quickly", "exactly"]


def _word_chain() -> dict[str, list[str]]:
    """Next-word lists of a first-order Markov chain over the 175 built-in seed instructions."""
    text = resources.files("refine_af_pipeline").joinpath("data/seed_tasks.jsonl").read_text(encoding="utf-8")
    following: dict[str, list[str]] = defaultdict(list)
    for line in text.splitlines():
        if line.strip():
            words = json.loads(line)["instruction"].split()
            for a, b in zip(["<s>", *words], [*words, "</s>"]):
                following[a].append(b)
    return following


def _near_duplicate(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.choice((1, 1, 2, 3))):  # one to three edits: some land above 0.7, some below
        op = rng.random()
        if op < 0.4:
            words.insert(rng.randrange(len(words) + 1), rng.choice(FILLERS))
        elif op < 0.7 and len(words) > 4:
            del words[rng.randrange(len(words))]
        else:
            words[rng.randrange(len(words))] = rng.choice(FILLERS)
    return " ".join(words)


def instruction_set(n: int, seed: int = 0) -> list[str]:
    """Instruction-like sentences walked from a word chain over the seed instructions (the
    vocabulary and phrasing of real tasks, 5 to 40 words), and about a third near-duplicates of
    earlier ones (words inserted, dropped or replaced), so both the accept and reject paths run."""
    rng = random.Random(seed)
    following = _word_chain()
    out: list[str] = []
    while len(out) < n:
        if out and rng.random() < 0.35:
            out.append(_near_duplicate(rng, rng.choice(out)))
            continue
        words, word = [], "<s>"
        while len(words) < 40:
            word = rng.choice(following[word])
            if word == "</s>":
                break
            words.append(word)
        if len(words) >= 5:
            out.append(" ".join(words))
    return out


# --- the Self-Instruct reference: rouge_scorer.score of each candidate against the whole pool, in a
# new multiprocessing pool for every candidate, as its bootstrap script does (it uses 4 workers; 2 here,
# one per core of this machine).
def selfinstruct_dedup(instructions: list[str]) -> list[bool]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool: list[str] = []
    keep = []
    for inst in instructions:
        if pool:
            with mp.Pool(2) as workers:
                scores = workers.map(partial(scorer.score, inst), pool)
        else:
            scores = []
        best = max((s["rougeL"].fmeasure for s in scores), default=0.0)
        keep.append(best <= THRESHOLD)
        if keep[-1]:
            pool.append(inst)
    return keep


# --- the Alpaca approach: the pool is tokenized once, rouge_scorer._score_lcs per pair, in a Pool.
def alpaca_dedup(instructions: list[str]) -> list[bool]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool_tokens: list[list[str]] = []
    keep = []
    with mp.Pool(2) as workers:
        for inst in instructions:
            tokens = scorer._tokenizer.tokenize(inst)
            scores = workers.map(partial(rouge_scorer._score_lcs, tokens), pool_tokens) if pool_tokens else []
            best = max((s.fmeasure for s in scores), default=0.0)
            keep.append(best <= THRESHOLD)
            if keep[-1]:
                pool_tokens.append(tokens)
    return keep


def ours_dedup(instructions: list[str]) -> list[bool]:
    return [d.keep for d in RougeDeduplicator(threshold=THRESHOLD).consider_many(instructions)]


METHODS = {"selfinstruct": selfinstruct_dedup, "alpaca": alpaca_dedup, "ours": ours_dedup}


def _child(method: str, n: int, queue) -> None:
    instructions = instruction_set(n)
    started = time.perf_counter()
    keep = METHODS[method](instructions)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((seconds, peak_mb, keep))


def run(method: str, n: int) -> tuple[float, float, list[bool]]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, n, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 2K, skip 50K")
    parser.add_argument("--sizes", type=int, nargs="+", help="override the sizes all three methods run at")
    parser.add_argument("--ours-sizes", type=int, nargs="*", help="override the sizes only ours runs at")
    args = parser.parse_args()
    shared_sizes = args.sizes or ([1000, 2000] if args.quick else [1000, 2000, 5000])
    ours_only = args.ours_sizes if args.ours_sizes is not None else ([] if args.quick else [10_000, 50_000])
    rows, identical, times = [], True, {}
    for n in shared_sizes:
        keeps = {}
        for method in METHODS:
            seconds, peak, keep = run(method, n)
            times[(method, n)] = seconds
            keeps[method] = keep
            rows.append((n, method, seconds, peak, sum(keep)))
        same = keeps["selfinstruct"] == keeps["alpaca"] == keeps["ours"]
        identical &= same
        print(
            f"N={n}: rejection rate {1 - sum(keeps['ours']) / n:.1%}, identical decisions: {'yes' if same else 'NO'}",
            flush=True,
        )
    for n in ours_only:
        seconds, peak, keep = run("ours", n)
        times[("ours", n)] = seconds
        rows.append((n, "ours", seconds, peak, sum(keep)))
        print(f"N={n}: rejection rate {1 - sum(keep) / n:.1%} (ours only)", flush=True)

    print()
    print(f"{'N':>6} {'method':>13} {'seconds':>9} {'peak MB':>8} {'kept':>6} {'ours x faster':>14}")
    for n, method, seconds, peak, kept in rows:
        ratio = times[(method, n)] / times[("ours", n)]
        print(f"{n:>6} {method:>13} {seconds:>9.2f} {peak:>8.0f} {kept:>6} {ratio:>14.1f}")
    ref_n = shared_sizes[-1]
    speedup = times[("selfinstruct", ref_n)] / times[("ours", ref_n)]
    ours_50k = f"{times[('ours', 50_000)]:.1f}" if ("ours", 50_000) in times else "skipped"
    label = f"{ref_n // 1000}k" if ref_n % 1000 == 0 else str(ref_n)
    print(
        f"dedup: identical={'yes' if identical else 'no'} "
        f"speedup_vs_selfinstruct_{label}={speedup:.0f} ours_50k_s={ours_50k}"
    )


if __name__ == "__main__":
    main()
