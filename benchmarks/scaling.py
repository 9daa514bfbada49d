"""Generation throughput of the ray backend with one and two single-CPU actors against the
in-process transformers backend, side by side in one run, on the same prompts.

The arms (the embedded model, greedy, every prompt in one generate call, as a stage's planned
batch is):
- inprocess: the transformers backend in this process, torch at its default threads (every core);
- ray1: the ray backend on a local Ray, one actor of one CPU (torch at one thread);
- ray2: the same with two such actors, each call's rows split between them.
Tokens/s counts the generated tokens over the wall time of the faster of two identical calls;
Ray's start, the actors' model loads and one small warm-up call per arm are not counted. (A Ray
started for an arm runs start-up processes of its own at up to 80% of a core for some seconds; a
first run that timed one call, with other work on the machine too, put the two-actor arm at 0.94x
the one-actor arm, a second at 1.47x.) Greedy rows must be the same in
every arm (the ray backend returns the in-process rows); the run says so (`same_rows`).

    .venv/bin/python benchmarks/scaling.py                  # 32 prompts, 64 new tokens
    .venv/bin/python benchmarks/scaling.py --prompts 64 --max-new-tokens 128

The last line is `scaling: ray2_vs_ray1=<r> ray1_vs_inprocess=<r>` (tokens/s over tokens/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed_generate(model, prompts, params, batch_size: int, repeats: int = 2) -> tuple[list, float]:
    """(generations, seconds of the fastest of `repeats` identical calls), after a two-prompt warm-up call."""
    from refine_af_pipeline.llm.backend import SamplingParams

    model.generate(prompts[:2], SamplingParams(max_new_tokens=4, do_sample=False), batch_size)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = model.generate(prompts, params, batch_size)
        times.append(time.perf_counter() - started)
    return out, min(times)


def ray_arm(model_dir: str, tokenizer, actors: int, prompts, params, batch_size: int) -> tuple[list, float]:
    from refine_af_pipeline.llm.ray_backend import RaySettings, ReplicaSpec, open_ray_models

    # A local Ray of exactly the machine's cores, started for the arm and stopped with its pool.
    served, pool = open_ray_models(
        ReplicaSpec(model_dir, device="cpu"), RaySettings(actors=actors, cpus_per_actor=1), tokenizer, {"base": None}
    )
    try:
        return timed_generate(served["base"], prompts, params, batch_size)
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, or a local model directory")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    from generation import chat_prompts  # benchmarks/generation.py: the instance-generation prompts

    from refine_af_pipeline.llm.backend import SamplingParams
    from resources import LanguageModelResource

    resource = LanguageModelResource(model=args.model, device="cpu")
    model_dir = resource.source().path
    local = resource.open_models({"base": None})["base"]
    prompts = chat_prompts(local.tokenizer, args.prompts)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=False)
    batch = len(prompts)  # one planned batch: the whole call
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy; {os.cpu_count()} cores; {model_dir}")

    arms = {"inprocess": timed_generate(local, prompts, params, batch)}
    print(f"inprocess: torch threads {torch.get_num_threads()}", flush=True)
    for actors in (1, 2):
        arms[f"ray{actors}"] = ray_arm(model_dir, local.tokenizer, actors, prompts, params, batch)

    print(f"{'arm':>10} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    rates = {}
    for name, (out, seconds) in arms.items():
        tokens = sum(g.n_tokens for g in out)
        rates[name] = tokens / seconds
        print(f"{name:>10} {tokens:>7} {seconds:>8.1f} {rates[name]:>9.1f}", flush=True)
    reference = arms["inprocess"][0]
    print(f"same_rows={all(out == reference for out, _ in arms.values())}")
    ray2_vs_ray1, ray1_vs_inprocess = rates["ray2"] / rates["ray1"], rates["ray1"] / rates["inprocess"]
    print(f"scaling: ray2_vs_ray1={ray2_vs_ray1:.2f} ray1_vs_inprocess={ray1_vs_inprocess:.2f}")


if __name__ == "__main__":
    main()
