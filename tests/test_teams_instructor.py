"""The instructor's environment and TRPO training on a stub reviewer (no language model)."""

import numpy as np
import pytest
from pydantic import ValidationError

from refine_af_pipeline.teams.environment import BatchedEvolutionVecEnv, InstructionEvolutionEnv
from refine_af_pipeline.teams.evolution import StepResult
from refine_af_pipeline.teams.instructor import (
    InstructorSettings,
    action_probabilities,
    load_policy,
    save_policy,
    train_instructor,
)
from refine_af_pipeline.teams.operations import OPERATION_NAMES
from refine_af_pipeline.teams.state import ChainState, encode, observation_size

pytestmark = pytest.mark.unit

SEEDS = [(f"s{k}", f"Write a short note about topic number {k}.") for k in range(12)]


def stub_step(rewarded: str):
    """A reviewer that rewards one operation only; the rewrite appends the operation's name."""
    calls = []

    def step(befores, operations, t):
        calls.append(len(befores))
        return [
            StepResult(op, b, f"{b} ({op})", 1.0 if op == rewarded else 0.0, None, None, False, False, 3, False)
            for b, op in zip(befores, operations)
        ]

    step.calls = calls
    return step


def test_training_on_a_stub_reviewer_learns_the_rewarded_operation(tmp_path):
    settings = InstructorSettings(episodes_per_update=16, updates=25, target_kl=0.05, seed=3)
    step = stub_step("concretize")
    env = BatchedEvolutionVecEnv(
        SEEDS, settings.operations, settings.horizon, step, settings.episodes_per_update, seed=3
    )
    result = train_instructor(env, settings)
    visited = np.array([t["observation"] for t in env.transitions[-16 * settings.horizon :]], dtype=np.float32)
    probs = action_probabilities(result.model, visited)
    k = OPERATION_NAMES.index("concretize")
    # Within 25 updates: on average over the states the last rollout visited, and a majority in every one
    # (late-chain states, with long instructions, are learned last).
    assert probs[:, k].mean() > 0.8 and probs[:, k].min() > 0.5, probs[:, k]
    # One batched call per step of the rollout, all episodes together.
    assert step.calls == [16] * (25 * settings.horizon)
    log = result.log
    assert len(log) == 25 and log[-1]["mean_reward"] > log[0]["mean_reward"]
    assert log[-1]["share_concretize"] > 0.7 and log[-1]["entropy"] < log[0]["entropy"]
    # Every update moved the policy: a line search that refused every step would leave KL at 0.
    assert all(row["kl"] > 1e-6 for row in log), [row["kl"] for row in log]
    # The saved weights give the same policy back.
    path = save_policy(result.model, tmp_path / "policy")
    assert np.allclose(load_policy(path, len(OPERATION_NAMES))(visited), probs, atol=1e-6)


def test_episodes_draw_seed_instructions_and_keep_every_intermediate_step():
    step = stub_step("deepen")
    env = BatchedEvolutionVecEnv(SEEDS, OPERATION_NAMES, 6, step, n_envs=4, seed=0)
    n = len(OPERATION_NAMES)
    deepen = OPERATION_NAMES.index("deepen")
    obs = env.reset()
    assert obs.shape == (4, observation_size(n)) and not obs[:, : n + 2].any()  # no previous operation, step 0
    for t in range(6):
        obs, rewards, dones, infos = env.step(np.full(4, deepen))
        assert dones.all() == (t == 5)
    terminal = infos[0]["terminal_observation"]
    # After the last step: deepen was the previous operation, the chain is at its end, the rewrite accepted.
    assert terminal[:n].tolist() == np.eye(n)[deepen].tolist() and terminal[n] == 1.0 and terminal[n + 1] == 0.0
    assert not obs[:, : n + 2].any()  # auto-reset: the next episode starts again
    assert [t["state"] for t in env.transitions if t["episode_env"] == 0][:2] == ["start", "after deepen"]
    chain = [t for t in env.transitions if t["episode_env"] == 0]
    assert [t["step"] for t in chain] == [1, 2, 3, 4, 5, 6]
    assert all(a["after"] == b["before"] for a, b in zip(chain, chain[1:]))  # each step rewrites the last
    # Several seed instructions are drawn, not one fixed seed.
    env.step(np.zeros(4, dtype=int))
    started = {t["seed_id"] for t in env.transitions if t["step"] == 1}
    assert len(started) > 1


def test_the_state_says_step_rejection_and_what_the_instruction_looks_like():
    n = len(OPERATION_NAMES)
    obs = encode(ChainState(2, 3, True, "How many apples must I buy for 12 people?"), n, 6)
    assert obs[2] == 1.0 and obs[:n].sum() == 1.0
    assert obs[n] == pytest.approx(0.5) and obs[n + 1] == 1.0
    assert obs[n + 2 :].tolist() == pytest.approx([9 / 50, 1.0, 1.0, 1.0])  # length, question, digit, constraint
    rejected = stub_step("nothing")  # every rewrite rejected: the state says so, the instruction stays
    env = BatchedEvolutionVecEnv(SEEDS, OPERATION_NAMES, 3, rejected, n_envs=2, seed=0)
    env.reset()
    obs, *_ = env.step(np.zeros(2, dtype=int))
    assert (obs[:, n + 1] == 1.0).all()
    assert env.transitions[-1]["after"] != env.envs[1].state.text


def test_the_gymnasium_environment_passes_the_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(InstructionEvolutionEnv(SEEDS, OPERATION_NAMES, 6, stub_step("breadth")), skip_render_check=True)


@pytest.mark.parametrize(
    "bad",
    [
        {"operations": ["add_constraint", "paraphrase"]},
        {"episodes_per_update": 0},
        {"horizon": 0},
        {"updates": 0},
        {"operations": ["deepen"]},
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValidationError) as err:
        InstructorSettings(**bad)
    assert next(iter(bad)) in str(err.value)
