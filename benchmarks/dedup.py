"""ROUGE-L de-duplication: the Self-Instruct reference, the Alpaca approach and ours, side by side.

    python benchmarks/dedup.py            # N = 1K, 2K, 5K (+ ours at 10K, 50K)
    python benchmarks/dedup.py --quick    # N up to 2K, 50K skipped; under a minute

Every (method, N) runs in a fresh process, so its peak resident memory is its own. The last line is
`dedup: identical=yes|no speedup_vs_selfinstruct_5k=<x> ours_50k_s=<s>` (with --quick the ratio is
at 2K and ours_50k_s=skipped).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import time
from functools import partial

from rouge_score import rouge_scorer

from refine_af_pipeline.rouge import RougeDeduplicator

THRESHOLD = 0.7

VERBS = ["Write", "Explain", "Summarize", "Describe", "List", "Suggest", "Compare", "Classify", "Rewrite",
         "Translate", "Identify", "Generate", "Create", "Outline", "Evaluate", "Predict", "Convert", "Find"]
OBJECTS = ["a short story", "the main idea", "three benefits", "a product description", "the differences",
           "a polite email", "the key steps", "a catchy slogan", "five questions", "a recipe", "the sentiment",
           "a haiku", "the causes", "a weekly plan", "the pros and cons", "a headline", "a summary", "an analogy"]
TOPICS = ["climate change", "remote work", "a new smartphone", "healthy breakfast", "the French revolution",
          "machine learning", "a job interview", "city cycling", "online privacy", "a birthday party",
          "renewable energy", "learning a language", "a small bakery", "space travel", "team meetings",
          "saving money", "a mystery novel", "public transport", "ocean pollution", "time management"]
TAILS = ["for a ten-year-old", "in one sentence", "using simple words", "for a business audience", "in under 50 words",
         "with an example", "as a bulleted list", "in a friendly tone", "for a newsletter", "step by step", ""]
FILLERS = ["please", "carefully", "briefly", "also", "clearly", "then", "now", "really", "quickly"]


def instruction_set(n: int, seed: int = 0) -> list[str]:
    """Template instructions over a wide vocabulary, a third of them near-duplicates of earlier ones
    (a word inserted, dropped or swapped), so both the accept and the reject paths are exercised."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.35:
            words = rng.choice(out).split()
            op = rng.random()
            if op < 0.4:
                words.insert(rng.randrange(len(words) + 1), rng.choice(FILLERS))
            elif op < 0.7 and len(words) > 4:
                del words[rng.randrange(len(words))]
            else:
                words[rng.randrange(len(words))] = rng.choice(FILLERS + TOPICS[0].split())
            out.append(" ".join(words))
        else:
            text = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} about {rng.choice(TOPICS)} {rng.choice(TAILS)}"
            extra = " ".join(rng.choice(TOPICS).split()[-1] for _ in range(rng.randint(0, 3)))
            out.append(f"{text} {extra}".strip() + ".")
    return out


# --- the Self-Instruct reference: rouge_scorer.score of each candidate against the whole pool, in a
# multiprocessing pool per candidate. One Pool is reused across candidates (kinder than a new one each).
def selfinstruct_dedup(instructions: list[str]) -> list[bool]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool: list[str] = []
    keep = []
    with mp.Pool(2) as workers:
        for inst in instructions:
            scores = workers.map(partial(scorer.score, inst), pool) if pool else []
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
        print(f"N={n}: rejection rate {1 - sum(keeps['ours']) / n:.1%}, identical decisions: {'yes' if same else 'NO'}",
              flush=True)
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
    print(f"dedup: identical={'yes' if identical else 'no'} speedup_vs_selfinstruct_{label}={speedup:.0f} ours_50k_s={ours_50k}")


if __name__ == "__main__":
    main()
