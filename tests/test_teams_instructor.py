"""The instructor's environment and TRPO training on a stub reviewer (no language model)."""

import numpy as np
import pytest
from pydantic import ValidationError

from refine_af_pipeline.teams.environment import BatchedEvolutionVecEnv, InstructionEvolutionEnv
from refine_af_pipeline.teams.evolution import StepResult
from refine_af_pipeline.teams.instructor import (InstructorSettings, action_probabilities, load_policy_probabilities,
                                                 save_policy, train_instructor)
from refine_af_pipeline.teams.operations import OPERATION_NAMES

SEEDS = [(f"s{k}", f"Write a short note about topic number {k}.") for k in range(12)]


def stub_step(rewarded: str):
    """A reviewer that rewards one operation only; the rewrite appends the operation's name."""
    calls = []

    def step(befores, operations, t):
        calls.append(len(befores))
        return [StepResult(op, b, f"{b} ({op})", 1.0 if op == rewarded else 0.0, None, None, False, False, 3, False)
                for b, op in zip(befores, operations)]

    step.calls = calls
    return step


def test_training_on_a_stub_reviewer_learns_the_rewarded_operation(tmp_path):
    settings = InstructorSettings(episodes_per_update=16, updates=25, target_kl=0.05, seed=3)
    step = stub_step("concretize")
    env = BatchedEvolutionVecEnv(SEEDS, settings.operations, settings.horizon, step, settings.episodes_per_update, seed=3)
    result = train_instructor(env, settings)
    probs = action_probabilities(result.model, len(OPERATION_NAMES))
    k = OPERATION_NAMES.index("concretize")
    assert probs[:, k].min() > 0.8, probs[:, k]  # in every state, within 25 updates
    # One batched call per step of the rollout, all episodes together.
    assert step.calls == [16] * (25 * settings.horizon)
    log = result.log
    assert len(log) == 25 and log[-1]["mean_reward"] > log[0]["mean_reward"]
    assert log[-1]["share_concretize"] > 0.7 and log[-1]["entropy"] < log[0]["entropy"]
    # Every update moved the policy: a line search that refused every step would leave KL at 0.
    assert all(row["kl"] > 1e-6 for row in log), [row["kl"] for row in log]
    # The saved weights give the same policy back.
    path = save_policy(result.model, tmp_path / "policy")
    assert np.allclose(load_policy_probabilities(path, len(OPERATION_NAMES)), probs, atol=1e-6)


def test_episodes_draw_seed_instructions_and_keep_every_intermediate_step():
    step = stub_step("deepen")
    env = BatchedEvolutionVecEnv(SEEDS, OPERATION_NAMES, 6, step, n_envs=4, seed=0)
    obs = env.reset()
    assert obs.shape == (4, len(OPERATION_NAMES)) and not obs.any()  # zeros at the start
    for t in range(6):
        obs, rewards, dones, infos = env.step(np.full(4, OPERATION_NAMES.index("deepen")))
        assert dones.all() == (t == 5)
    assert (infos[0]["terminal_observation"] == np.eye(len(OPERATION_NAMES))[OPERATION_NAMES.index("deepen")]).all()
    assert not obs.any()  # auto-reset: the next episode starts from zeros
    chain = [t for t in env.transitions if t["episode_env"] == 0]
    assert [t["step"] for t in chain] == [1, 2, 3, 4, 5, 6]
    assert all(a["after"] == b["before"] for a, b in zip(chain, chain[1:]))  # each step rewrites the last
    # Several seed instructions are drawn, not one fixed seed.
    env.step(np.zeros(4, dtype=int))
    started = {t["seed_id"] for t in env.transitions if t["step"] == 1}
    assert len(started) > 1


def test_the_gymnasium_environment_passes_the_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(InstructionEvolutionEnv(SEEDS, OPERATION_NAMES, 6, stub_step("breadth")), skip_render_check=True)


@pytest.mark.parametrize("bad", [{"operations": ["add_constraint", "paraphrase"]}, {"episodes_per_update": 0},
                                 {"horizon": 0}, {"updates": 0}, {"operations": ["deepen"]}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValidationError) as err:
        InstructorSettings(**bad)
    assert next(iter(bad)) in str(err.value)
