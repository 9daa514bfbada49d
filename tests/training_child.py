"""One training run on the tiny model in its own process, for the kill-and-resume tests: GRPO, SFT
or the TeaMs-RL instructor, checkpointing into a given folder; the result goes to a JSON file.

    python tests/training_child.py {grpo,sft,instructor} MODEL_DIR CHECKPOINTS OUT_JSON [PAUSE_FROM_STEP]

PAUSE_FROM_STEP: from that step on, the run sleeps a second after each step, so the test can kill
it after its first checkpoint and before it ends (the tiny model trains a step in well under one).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from refine_af_pipeline.training.checkpoints import Checkpoints  # noqa: E402

INSTRUCTIONS = [
    "Describe a quiet river garden",
    "List three useful habits for every student",
    "Compare two ancient bridges",
    "Suggest a simple recipe for a team",
    "Explain why the sky looks blue",
    "Write a short note to a neighbour",
]
MAX_STEPS = 6
EVERY = 2


def pauser(pause_from: int | None):
    def on_step(step: int) -> None:
        if pause_from is not None and step >= pause_from:
            time.sleep(1.0)

    return on_step


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


class VowelScorer:
    """A reward that differs between completions (the tiny model's text never passes the real
    instance gate, so every real reward would be equal and every loss 0): the share of vowels,
    a deterministic function of the text, as the learned-reward component."""

    def score_texts(self, instructions, texts, cut=None, is_classification=None):
        from refine_af_pipeline.feedback.scores import COMPONENTS, ScoredInstance

        scored = []
        for text in texts:
            share = sum(ch in "aeiou" for ch in text.lower()) / max(len(text), 1)
            components = {name: None for name in COMPONENTS} | {"learned_reward": share}
            scored.append(ScoredInstance("", text, "ok", None, components, 4.0 * share))
        return scored


def run_grpo(model_dir: Path, checkpoints: Checkpoints, out: Path, pause) -> dict:
    from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source
    from refine_af_pipeline.training.rl import RLSettings, train_policy

    source = resolve_model_source(str(model_dir))
    tokenizer = load_tokenizer(source)
    scorer = VowelScorer()
    settings = RLSettings(
        max_steps=MAX_STEPS,
        prompts_per_step=2,
        group_size=4,
        max_completion_length=12,
        learning_rate=5e-2,
        checkpoint_every_steps=EVERY,
    )
    result = train_policy(
        load_causal_lm(source, "cpu", None),
        tokenizer,
        INSTRUCTIONS,
        scorer,
        settings,
        out.parent / "run",
        "cpu",
        on_log=lambda step, total, logs: pause(step),
        checkpoints=checkpoints,
    )
    return {
        "losses": [row["loss"] for row in result.log],
        "rewards": [row["reward"] for row in result.log],
        "steps": [row["step"] for row in result.log],
        "reward_calls": len(result.log),
        "learned_reward_mean": [row["learned_reward_mean"] for row in result.log],
        "resumed_from_step": result.resumed_from_step,
        "steps_taken": result.steps_taken,
        "adapter": digest(result.adapter_dir),
    }


def run_sft(model_dir: Path, checkpoints: Checkpoints, out: Path, pause) -> dict:
    from refine_af_pipeline.llm.models import load_causal_lm, load_tokenizer, resolve_model_source
    from refine_af_pipeline.training.sft import SFTSettings, finetune

    source = resolve_model_source(str(model_dir))
    triples = [(i, "", f"An answer about {i.lower()}.") for i in INSTRUCTIONS * 2]
    settings = SFTSettings(epochs=2, batch_size=2, train_batch_size=1, max_length=64, checkpoint_every_steps=EVERY)
    result = finetune(
        load_causal_lm(source, "cpu", None),
        load_tokenizer(source),
        triples,
        settings,
        out.parent / "run",
        "cpu",
        on_log=lambda step, total, logs: pause(step) if "loss" in logs else None,
        checkpoints=checkpoints,
    )
    return {
        "losses": [row["loss"] for row in result.log],
        "steps": [row["step"] for row in result.log],
        "resumed_from_step": result.resumed_from_step,
        "steps_taken": result.steps_taken,
        "adapter": digest(result.adapter_dir),
    }


def fake_step(texts, operations, step):
    """The environment's step without a model: a rewrite appends the operation's name, and the
    reward favours some operations over others, so the policy has something to learn."""
    from refine_af_pipeline.teams.evolution import StepResult

    results = []
    for text, op in zip(texts, operations, strict=True):
        reward = float(len(op) % 3) / 2.0
        results.append(StepResult(op, text, f"{text} {op}", reward, None, None, False, False, 3, False))
    return results


def run_instructor(model_dir: Path, checkpoints: Checkpoints, out: Path, pause) -> dict:
    from refine_af_pipeline.teams.environment import BatchedEvolutionVecEnv
    from refine_af_pipeline.teams.instructor import InstructorSettings, train_instructor

    settings = InstructorSettings(horizon=2, episodes_per_update=4, updates=5, checkpoint_every_updates=1)
    seeds = [(f"seed-{k}", text) for k, text in enumerate(INSTRUCTIONS)]
    env = BatchedEvolutionVecEnv(seeds, settings.operations, settings.horizon, fake_step, 4, seed=settings.seed)
    result = train_instructor(env, settings, lambda row: pause(row["update"]), Checkpoints(checkpoints.folder, 1))
    weights = hashlib.sha256()
    for name, tensor in sorted(result.model.policy.state_dict().items()):
        weights.update(name.encode() + tensor.numpy().tobytes())
    return {
        "losses": [row["kl"] for row in result.log],
        "rewards": [row["mean_reward"] for row in result.log],
        "steps": [row["update"] for row in result.log],
        "transitions": len(env.transitions),
        "seed_ids": [t["seed_id"] for t in env.transitions],
        "resumed_from_step": result.resumed_from_update,
        "steps_taken": result.updates_taken,
        "adapter": weights.hexdigest()[:16],
    }


def main() -> None:
    kind, model_dir, folder, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    pause = pauser(int(sys.argv[5]) if len(sys.argv) > 5 else None)
    checkpoints = Checkpoints(folder, EVERY)
    runner = {"grpo": run_grpo, "sft": run_sft, "instructor": run_instructor}[kind]
    out.write_text(json.dumps(runner(model_dir, checkpoints, out, pause)))


if __name__ == "__main__":
    main()
