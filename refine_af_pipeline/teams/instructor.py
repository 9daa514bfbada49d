"""Training the instructor policy with sb3-contrib's TRPO (the algorithm of the published code)
on the batched evolution environment, one rollout of `episodes_per_update` episodes per update,
and reading the policy back as a function from states (state.py) to action probabilities."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from ..llm.backend import SamplingParams
from ..settings_types import (
    DEFAULT_TOP_P,
    GenerationBatchSettings,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Share,
)
from ..training.checkpoints import Checkpoints
from .environment import BatchedEvolutionVecEnv
from .operations import OPERATION_NAMES
from .reviewer import NEAR_COPY_ROUGE_L


class InstructorSettings(GenerationBatchSettings):
    """Settings of `teams_operation_policy`. The comparison and the evolved instructions run with
    the operations, horizon, sampling and reviewer rules the policy was trained with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operations: list[str] = Field(
        list(OPERATION_NAMES), description=(f"the actions, in order (any of: {', '.join(OPERATION_NAMES)})")
    )
    horizon: PositiveInt = Field(6, description="operations per episode (the paper: 6)")
    episodes_per_update: PositiveInt = Field(16, description="episodes per TRPO rollout (one update each)")
    updates: PositiveInt = Field(10, description="TRPO updates")
    heldout_share: Share = Field(
        0.3, description=("share of seed tasks (by a stable id hash) held out of training for teams_policy_comparison")
    )
    target_kl: PositiveFloat = Field(0.05, description="TRPO's KL trust region per update")
    hidden_units: PositiveInt = Field(32, description="units of the policy and value MLPs' one hidden layer")
    gamma: Probability = Field(0.99, description="discount")
    critic_learning_rate: PositiveFloat = Field(1e-3, description="learning rate of the value function")
    max_new_tokens: PositiveInt = Field(64, description="tokens per rewrite at most (a rewrite is one line)")
    do_sample: bool = Field(
        True,
        description=(
            "sample rewrites, seeded per step (false: greedy, which with the embedded model hands back the task "
            "unchanged or the example far more often: 25 of 48 rewrites passed the reviewer's rules against 35 of 48 "
            "sampled at 0.8, and a chain stuck on a rejected rewrite repeats it)"
        ),
    )
    temperature: PositiveFloat = Field(0.8, description="rewrite sampling temperature (do_sample)")
    top_p: Probability = Field(DEFAULT_TOP_P, description="rewrite nucleus sampling (do_sample)")
    near_copy_rouge_l: Probability = Field(
        NEAR_COPY_ROUGE_L,
        description=("reviewer rule: a rewrite at least this ROUGE-L-similar to the instruction it rewrote scores 0"),
    )
    seed: int = Field(0, description="seed of the episode draws, the policy's initialisation and the sampling")
    checkpoint_every_updates: NonNegativeInt = Field(
        1,
        description=(
            "save the policy, its optimizer, the episode counter and the RNG states every this many TRPO updates (0: "
            "never); a re-run of a killed step resumes from the last save"
        ),
    )

    @field_validator("operations")
    @classmethod
    def _known_operations(cls, ops: list[str]) -> list[str]:
        unknown = [o for o in ops if o not in OPERATION_NAMES]
        if unknown:
            raise ValueError(f"unknown operation(s) {unknown}; the operations are {', '.join(OPERATION_NAMES)}")
        if len(ops) < 2 or len(set(ops)) != len(ops):
            raise ValueError(f"operations must name at least two different operations, each once; got {ops}")
        return ops

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.do_sample)


@dataclass
class InstructorResult:
    model: object  # the sb3-contrib TRPO model
    log: list[dict] = field(default_factory=list)
    resumed_from_update: int = 0  # the checkpoint's update a re-run went on from (0: trained from the start)
    updates_taken: int = 0  # TRPO updates this call ran


def action_probabilities(model, observations: np.ndarray) -> np.ndarray:
    """The policy's action distribution in each observed state (rows of state.encode)."""
    import torch

    obs = np.asarray(observations, dtype=np.float32)
    with torch.no_grad():
        dist = model.policy.get_distribution(torch.as_tensor(obs, device=model.policy.device))
        return dist.distribution.probs.cpu().numpy().astype(np.float64)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def _entropy(p: np.ndarray) -> float:
    return float(np.mean(-np.sum(p * np.log(p + 1e-12), axis=1)))


def build_trpo(env: BatchedEvolutionVecEnv, settings: InstructorSettings):
    from sb3_contrib import TRPO

    rollout = env.num_envs * settings.horizon
    # The critic fits on the whole rollout at once (a rollout is small: episodes x horizon).
    return TRPO(
        "MlpPolicy",
        env,
        n_steps=settings.horizon,
        batch_size=rollout,
        gamma=settings.gamma,
        target_kl=settings.target_kl,
        learning_rate=settings.critic_learning_rate,
        policy_kwargs=dict(net_arch=dict(pi=[settings.hidden_units], vf=[settings.hidden_units])),
        seed=settings.seed,
        device="cpu",
        verbose=0,
    )


def train_instructor(
    env: BatchedEvolutionVecEnv,
    settings: InstructorSettings,
    on_update: Callable[[dict], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> InstructorResult:
    """`settings.updates` TRPO updates; a log row per update: the rollout's mean reward and action
    shares, then the policy's mean entropy over states and its mean KL from before the update.
    With `checkpoints`, saved every N updates there and resumed from the last complete save (the
    folder is removed at the end)."""
    resume = checkpoints.latest() if checkpoints is not None else None
    if resume is not None:
        result = resume_instructor(resume, env)
    else:
        result = InstructorResult(build_trpo(env, settings))
    model, ops = result.model, settings.operations
    for update in range(result.resumed_from_update + 1, settings.updates + 1):
        start = len(env.transitions)
        params = {k: v.clone() for k, v in model.policy.state_dict().items()}
        model.learn(total_timesteps=env.num_envs * settings.horizon, reset_num_timesteps=update == 1)
        rollout = env.transitions[start:]
        # Entropy and KL over the states this rollout visited: the policy before and after the update.
        observed = np.array([t["observation"] for t in rollout], dtype=np.float32)
        after = action_probabilities(model, observed)
        updated = {k: v.clone() for k, v in model.policy.state_dict().items()}
        model.policy.load_state_dict(params)
        before = action_probabilities(model, observed)
        model.policy.load_state_dict(updated)
        starts = observed[[t["step"] == 1 for t in rollout]]
        start_probs = (
            after[[t["step"] == 1 for t in rollout]].mean(axis=0) if len(starts) else np.full(len(ops), np.nan)
        )
        counts = Counter(t["operation"] for t in rollout)
        row = {
            "update": update,
            "episodes": env.num_envs,
            "transitions": len(rollout),
            "mean_reward": float(np.mean([t["reward"] for t in rollout])),
            "rule_zero_share": float(np.mean([t["rule"] is not None for t in rollout])),
            "entropy": _entropy(after),
            "kl": _kl(before, after),
            **{f"share_{op}": counts[op] / len(rollout) for op in ops},
            **{f"start_probability_{op}": float(start_probs[k]) for k, op in enumerate(ops)},
        }
        result.log.append(row)
        result.updates_taken += 1
        if on_update:
            on_update(row)
        if checkpoints is not None and checkpoints.enabled and update % checkpoints.every_steps == 0:
            save_instructor_checkpoint(checkpoints, update, result, env)
    if checkpoints is not None:
        checkpoints.discard()
    return result


def save_instructor_checkpoint(
    checkpoints: Checkpoints, update: int, result: InstructorResult, env: BatchedEvolutionVecEnv
) -> None:
    """After update `update`: the policy with its optimizer (sb3's save), then the state sb3 does
    not save (our log, the environment's transitions and episode counter, the RNG states) as the
    step state; the checkpoint's trainer_state.json, written last, marks it complete."""
    import json
    import random
    import shutil

    import torch

    folder = checkpoints.folder / f"checkpoint-{update}"
    folder.mkdir(parents=True, exist_ok=True)
    result.model.save(str(folder / "policy.zip"))
    numpy_state = np.random.get_state()
    checkpoints.write_state(
        update,
        {
            "log": result.log,
            "transitions": env.transitions,
            # The episodes drawn before the auto-reset that ended this update: a resumed run's reset
            # draws those same next episodes again.
            "episodes": env.episodes_drawn - env.num_envs,
            "torch_rng": torch.get_rng_state().tolist(),
            "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "python_rng": _jsonable(random.getstate()),
        },
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": update}))
    for older in checkpoints.folder.glob("checkpoint-*"):
        if older != folder:
            shutil.rmtree(older, ignore_errors=True)


def resume_instructor(checkpoint: Path, env: BatchedEvolutionVecEnv) -> InstructorResult:
    """The TRPO model, log and environment as they were after the checkpoint's update."""
    import random

    import torch
    from sb3_contrib import TRPO

    from ..training.checkpoints import step_of

    update = step_of(checkpoint)
    state = Checkpoints(checkpoint.parent, 1).read_state(update)
    model = TRPO.load(str(checkpoint / "policy.zip"), env=env, device="cpu")
    env.transitions[:] = state["transitions"]
    env.episodes_drawn = state["episodes"]
    # After load, which seeds the RNGs again: the states of the moment the checkpoint was taken.
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(_tupled(state["python_rng"]))
    return InstructorResult(model, list(state["log"]), resumed_from_update=update)


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def save_policy(model, path: Path) -> Path:
    model.save(str(path))
    return Path(str(path) if str(path).endswith(".zip") else f"{path}.zip")


def load_policy(path: str | Path, n_operations: int) -> Callable[[np.ndarray], np.ndarray]:
    """The saved policy as a function from observations (state.encode rows) to action distributions."""
    from sb3_contrib import TRPO

    from .state import observation_size

    model = TRPO.load(str(path), device="cpu")
    if model.action_space.n != n_operations:
        raise ValueError(f"the policy at {path} has {model.action_space.n} actions, expected {n_operations}")
    if model.observation_space.shape != (observation_size(n_operations),):
        raise ValueError(
            f"the policy at {path} reads states of shape {model.observation_space.shape}, this version "
            f"{(observation_size(n_operations),)}: materialize teams_operation_policy again"
        )
    return lambda observations: action_probabilities(model, observations)
