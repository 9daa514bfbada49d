"""The evaluation step's work on prompts of very different lengths, before and after the decode
loop: each prompt's greedy first line (16 new tokens at most) and the log-likelihood of each of its
references, read on one prefill of the prompt, for one model.

- before: the path of commit 4c5af1a: prompts sorted by length and cut into batches of batch_size
  rows, whatever their length; each batch prefilled at once, its references scored on that
  prefill, then `model.generate` from it until the batch's last row has ended its line;
- after: `generate_and_score_continuations` as the evaluation asset calls it now: batches cut by
  rows and by positions (a long prompt runs in a small batch), and the decode loop (rows leave as
  they end);
- after-bf16: the same with the model in bfloat16 (`dtype: bfloat16`), where the CPU has bf16
  matrix units: long prompts make this work prefill-bound, compute rather than memory.

The task set has long definitions, as Super-NaturalInstructions' do (up to about 3,000
characters): each built-in task's definition is extended with the definitions of the tasks after
it, to lengths spread evenly from its own (about 180 characters) to --longest characters. Each
method runs in a process of its own, so its peak RSS is its own. Tokens/s counts every token the
model reads or writes (prompt, references, answer) over wall time, model loading excluded.

    .venv/bin/python benchmarks/evaluation_scoring.py                # 64 prompts, batch 96
    .venv/bin/python benchmarks/evaluation_scoring.py --prompts 128 --longest 3000

The last line is `evaluation_scoring: after_vs_before_speed=<r> before_peak_mib=<m>
after_peak_mib=<m> same_answers=<share> max_loglik_difference=<d>` (answers and log-likelihoods of
after against before), then `bf16_vs_before_speed`, `bf16_peak_mib`, `bf16_same_answers` and
`bf16_max_loglik_difference` when the bf16 row ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def long_definition_items(n: int, longest: int) -> list[tuple[str, list[str]]]:
    """(prompt, references) for n instances of built-in tasks whose definitions are lengthened."""
    from refine_af_pipeline.evaluation.tasks import load_tasks, reference_continuations
    from refine_af_pipeline.llm.prompts import evaluation_prompt

    tasks = load_tasks()
    items = []
    for k in range(n):
        task = tasks[k % len(tasks)]
        target = len(task.definition) + (longest - len(task.definition)) * k // max(n - 1, 1)
        definition, j = task.definition, 1
        while len(definition) < target:
            definition += " " + tasks[(k + j) % len(tasks)].definition
            j += 1
        instance = task.instances[(k // len(tasks)) % len(task.instances)]
        items.append(
            (evaluation_prompt(definition[:target], instance.input), reference_continuations(instance.references))
        )
    return items


def before(model, tokenizer, prompts, continuations, params, batch_size: int, score_batch_size: int):
    """The pre-issue evaluation path (see the module docstring)."""
    import torch

    from refine_af_pipeline.llm.generation import (
        decode_new_tokens,
        eos_ids_of,
        generation_kwargs,
        length_sorted_batches,
        position_ids,
    )
    from refine_af_pipeline.llm.prefix_scoring import _score_on_prefix

    eos_ids = eos_ids_of(model, tokenizer)
    answers, scores = [None] * len(prompts), [None] * len(prompts)
    for rows in length_sorted_batches(tokenizer, prompts, batch_size):
        enc = tokenizer(
            [prompts[i] for i in rows], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            prefix = model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=position_ids(mask[:, :-1]),
                use_cache=True,
                logits_to_keep=1,
            ).past_key_values
            scored = _score_on_prefix(
                model, tokenizer, prefix, ids, mask, [continuations[i] for i in rows], "cpu", score_batch_size
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=prefix,
                **generation_kwargs(tokenizer, params, ids.shape[1], True),
            )
        for i, g, s in zip(rows, decode_new_tokens(tokenizer, out[:, ids.shape[1] :], eos_ids), scored):
            answers[i], scores[i] = g, s
    return answers, scores


def after(model, tokenizer, prompts, continuations, params, batch_size: int, score_batch_size: int):
    from refine_af_pipeline.llm.prefix_scoring import generate_and_score_continuations

    return generate_and_score_continuations(
        model,
        tokenizer,
        prompts,
        continuations,
        params,
        batch_size,
        0,
        stop_after_first_line=True,
        score_batch_size=score_batch_size,
    )


def run_one(args) -> None:
    """In a child process: one method's figures as one JSON line."""
    from refine_af_pipeline.llm.backend import SamplingParams
    from resources import LanguageModelResource

    dtype = "bfloat16" if args.method == "after-bf16" else "auto"
    model, tokenizer, _, _ = LanguageModelResource(model=args.model, dtype=dtype).load()
    items = long_definition_items(args.prompts, args.longest)
    prompts, continuations = [p for p, _ in items], [c for _, c in items]
    params = SamplingParams(max_new_tokens=16, do_sample=False)
    method = {"before": before, "after": after, "after-bf16": after}[args.method]
    started = time.perf_counter()
    answers, scores = method(model, tokenizer, prompts, continuations, params, args.batch_size, args.score_batch_size)
    seconds = time.perf_counter() - started
    read = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    read += sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for cs in continuations for c in cs)
    written = sum(a.n_tokens for a in answers)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "FIGURES "
        + json.dumps(
            dict(
                seconds=seconds,
                tokens=read + written,
                peak_mib=peak_mib,
                answers=[a.text for a in answers],
                scores=scores,
            )
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--longest", type=int, default=3000, help="characters of the longest definition")
    parser.add_argument("--batch-size", type=int, default=96, help="the language model resource's default")
    parser.add_argument("--score-batch-size", type=int, default=16)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        run_one(args)
        return
    figures = {}
    print(
        f"{args.prompts} prompts, definitions up to {args.longest} characters, "
        f"batch {args.batch_size}, model {args.model}"
    )
    print(f"{'method':>10} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'peak MiB':>9}")
    from generation import bf16_matrix_units

    for method in ("before", "after") + (("after-bf16",) if bf16_matrix_units() else ()):
        command = [
            sys.executable,
            __file__,
            "--method",
            method,
            "--model",
            args.model,
            "--prompts",
            str(args.prompts),
            "--longest",
            str(args.longest),
            "--batch-size",
            str(args.batch_size),
            "--score-batch-size",
            str(args.score_batch_size),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("FIGURES ")), None)
        if line is None:
            raise RuntimeError(f"{method} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        f = figures[method] = json.loads(line[8:])
        print(
            f"{method:>10} {f['seconds']:>8.1f} {f['tokens']:>7} "
            f"{f['tokens'] / f['seconds']:>9.1f} {f['peak_mib']:>9.0f}",
            flush=True,
        )
    b = figures["before"]

    def against_before(f) -> tuple[float, float, float]:
        same = sum(x == y for x, y in zip(b["answers"], f["answers"])) / len(f["answers"])
        diff = max(
            (abs(u - v) for sb, sa in zip(b["scores"], f["scores"]) for lb, la in zip(sb, sa) for u, v in zip(lb, la)),
            default=0.0,
        )
        return (f["tokens"] / f["seconds"]) / (b["tokens"] / b["seconds"]), same, diff

    speed, same, diff = against_before(figures["after"])
    line = (
        f"evaluation_scoring: after_vs_before_speed={speed:.2f} before_peak_mib={b['peak_mib']:.0f} "
        f"after_peak_mib={figures['after']['peak_mib']:.0f} same_answers={same:.3f} max_loglik_difference={diff:.2e}"
    )
    if "after-bf16" in figures:
        speed, same, diff = against_before(figures["after-bf16"])
        line += (
            f" bf16_vs_before_speed={speed:.2f} bf16_peak_mib={figures['after-bf16']['peak_mib']:.0f} "
            f"bf16_same_answers={same:.3f} bf16_max_loglik_difference={diff:.2e}"
        )
    print(line)


if __name__ == "__main__":
    main()
