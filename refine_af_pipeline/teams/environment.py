"""The instructor's environment: observation = the chain's state (state.py: the previous
operation, the step, whether the last rewrite was rejected, features of the current instruction),
action = the next operation, reward = the reviewer's judgement of the rewrite; an episode is
`horizon` operations from one seed instruction drawn from the training seeds.

`InstructionEvolutionEnv` is a plain gymnasium environment. `BatchedEvolutionVecEnv` runs many
of them as a stable-baselines3 VecEnv that steps all episodes with one batched call of the step
function (DummyVecEnv would step them one by one: one LLM call per episode per step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from .evolution import StepResult
from .state import ChainState, encode, observation_size, state_key

# (instructions, operation names, step index) -> one StepResult each
StepFn = Callable[[Sequence[str], Sequence[str], int], list[StepResult]]


class InstructionEvolutionEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, seeds: Sequence[tuple[str, str]], operations: Sequence[str], horizon: int, step_fn: StepFn):
        if not seeds:
            raise ValueError("the environment needs at least one seed instruction")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.seeds, self.operations, self.horizon, self.step_fn = list(seeds), list(operations), horizon, step_fn
        self.observation_space = gym.spaces.Box(0.0, 2.0, (observation_size(len(operations)),), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(operations))
        self._seed_id, self._seed_text = "", ""
        self.state = ChainState(None, 0, False, "")

    def observation(self) -> np.ndarray:
        return encode(self.state, len(self.operations), self.horizon)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._seed_id, self._seed_text = self.seeds[int(self.np_random.integers(len(self.seeds)))]
        self.state = ChainState(None, 0, False, self._seed_text)
        return self.observation(), {"seed_id": self._seed_id}

    # The step in two halves, so a vector of environments can batch the model calls in between.
    def pending(self, action: int) -> tuple[str, str, int]:
        return self.state.text, self.operations[int(action)], self.state.step

    def complete(self, action: int, result: StepResult):
        before = self.state
        # A rewrite the rules rejected leaves the instruction as it was (Evol-Instruct drops failed evolutions).
        accepted = result.reward > 0
        self.state = ChainState(int(action), before.step + 1, not accepted, result.after if accepted else before.text)
        info = dict(
            seed_id=self._seed_id,
            seed_instruction=self._seed_text,
            step=self.state.step,
            state=state_key(before, self.operations),
            **asdict(result),
        )
        return self.observation(), float(result.reward), self.state.step >= self.horizon, False, info

    def step(self, action):
        before, operation, t = self.pending(action)
        return self.complete(action, self.step_fn([before], [operation], t)[0])


class BatchedEvolutionVecEnv(VecEnv):
    """`n_envs` InstructionEvolutionEnv episodes stepped together; auto-reset as SB3 expects."""

    def __init__(
        self,
        seeds: Sequence[tuple[str, str]],
        operations: Sequence[str],
        horizon: int,
        step_fn: StepFn,
        n_envs: int,
        seed: int = 0,
    ):
        self.envs = [InstructionEvolutionEnv(seeds, operations, horizon, step_fn) for _ in range(n_envs)]
        self.step_fn = step_fn
        super().__init__(n_envs, self.envs[0].observation_space, self.envs[0].action_space)
        self._base_seed = seed
        self.episodes_drawn = 0
        self._actions = np.zeros(n_envs, dtype=np.int64)
        self.transitions: list[dict] = []  # every step of every episode, in order

    def reset(self):
        obs = [self._reset_one(k) for k in range(self.num_envs)]
        return np.stack(obs)

    def _reset_one(self, k: int) -> np.ndarray:
        # Each episode its own seed: the draw of seed instructions is reproducible and differs per episode.
        obs, _ = self.envs[k].reset(seed=self._base_seed * 1_000_003 + self.episodes_drawn)
        self.episodes_drawn += 1
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        pending = [env.pending(a) for env, a in zip(self.envs, self._actions)]
        # Every episode is at the same step (same horizon, reset together), so one call serves all.
        results = self.step_fn([p[0] for p in pending], [p[1] for p in pending], pending[0][2])
        obs, rewards, dones, infos = [], [], [], []
        for k, (env, action, result) in enumerate(zip(self.envs, self._actions, results)):
            observed = env.observation().tolist()
            o, r, terminated, truncated, info = env.complete(action, result)
            self.transitions.append(dict(episode_env=k, observation=observed, **info))
            if terminated or truncated:
                info = {**info, "terminal_observation": o, "TimeLimit.truncated": False}
                o = self._reset_one(k)
            obs.append(o)
            rewards.append(r)
            dones.append(terminated or truncated)
            infos.append(info)
        return np.stack(obs), np.array(rewards, dtype=np.float32), np.array(dones), infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name, indices=None):
        return [getattr(self.envs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name, value, indices=None) -> None:
        for i in self._get_indices(indices):
            setattr(self.envs[i], attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        return [getattr(self.envs[i], method_name)(*method_args, **method_kwargs) for i in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._get_indices(indices)]

    def seed(self, seed: int | None = None):
        self._base_seed = seed or 0
        return [self._base_seed + k for k in range(self.num_envs)]
