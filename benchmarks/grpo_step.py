"""GRPO's step time on the embedded model with transformers' top-p warper (before) and with the
sort-free nucleus processor (after), and the share of each step spent generating the rollouts.

Both arms train the same steps (the demo's shape: 2 prompts x 4 completions per step, 96 tokens,
temperature 0.7, top_p 0.95) on the same instructions from a fresh copy of the model, with the
default feedback judges; the arms alternate (before, after, before, after ...) so that a change
in machine load hits both. Generation time is the time inside the policy's `generate` calls.

    .venv/bin/python benchmarks/grpo_step.py --steps 3 --repeats 1

The last line is `grpo_step: before_step_s=<s> after_step_s=<s> before_generation_share=<r>
after_generation_share=<r> generation_speedup=<r>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def one_arm(sort_free: bool, steps: int, instructions: list[str]) -> tuple[float, float]:
    """(seconds per step, seconds per step inside generate) of one training run."""
    import numpy as np

    import refine_af_pipeline.training.rl as rl
    from refine_af_pipeline.feedback.reward_model import EmbeddingRewardModel
    from refine_af_pipeline.feedback.setup import EMBEDDED_MINILM, embedding_id
    from refine_af_pipeline.llm.transformers_backend import TransformersModel
    from resources import FeedbackScorerResource, LanguageModelResource

    model, tokenizer, _, _ = LanguageModelResource(model="embedded").load()
    judge, _, _, _ = LanguageModelResource(model="embedded").load()
    # A learned reward of the pipeline's shape (its cosine feature only): the reward's cost, not its fit.
    weights = np.zeros(2 * 384 + 1)
    weights[-1] = 1.0
    folder = EmbeddingRewardModel(None, weights, embedding_id(EMBEDDED_MINILM), "benchmark").save(
        Path(tempfile.mkdtemp(prefix="grpo-step-")) / "learned_reward"
    )
    scorer = FeedbackScorerResource().build(
        TransformersModel(judge, tokenizer, "embedded"), "cpu", batch_size=16, learned_reward_dir=str(folder)
    )
    inside = [0.0]
    real_install = rl.sort_free_rollouts

    @contextmanager
    def install(trainer, top_p, temperature):
        with real_install(trainer, top_p, temperature) if sort_free else nullcontext():
            real_generate = trainer.model.generate

            def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return real_generate(*args, **kwargs)
                finally:
                    inside[0] += time.perf_counter() - started

            trainer.model.generate = timed
            yield sort_free

    rl.sort_free_rollouts = install
    try:
        settings = rl.RLSettings(max_steps=steps, prompts_per_step=2, group_size=4)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            rl.train_policy(model, tokenizer, instructions, scorer, settings, Path(tmp), "cpu")
            seconds = time.perf_counter() - started
    finally:
        rl.sort_free_rollouts = real_install
    return seconds / steps, inside[0] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from refine_af_pipeline.instructions.seeds import load_seed_tasks

    instructions = [t.instruction for t in load_seed_tasks()[: 2 * args.steps]]
    figures: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    print(f"{'arm':>6} {'s/step':>7} {'generate s/step':>16} {'share':>6}")
    for _ in range(args.repeats):
        for arm in ("before", "after"):
            step, generation = one_arm(arm == "after", args.steps, instructions)
            figures[arm].append((step, generation))
            print(f"{arm:>6} {step:>7.1f} {generation:>16.1f} {generation / step:>6.2f}", flush=True)
    mean = {arm: tuple(sum(v[i] for v in runs) / len(runs) for i in range(2)) for arm, runs in figures.items()}
    (bs, bg), (as_, ag) = mean["before"], mean["after"]
    print(
        f"grpo_step: before_step_s={bs:.1f} after_step_s={as_:.1f} before_generation_share={bg / bs:.2f} "
        f"after_generation_share={ag / as_:.2f} generation_speedup={bg / ag:.2f}"
    )


if __name__ == "__main__":
    main()
