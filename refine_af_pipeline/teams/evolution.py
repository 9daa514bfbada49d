"""One evolution step for many instructions at once: rewrite each with its operation (one batched
generate call for what the cache does not hold), then review each rewrite. Chains of steps on
seed instructions, for any way of choosing the next operation (a policy, uniform, fixed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..llm.backend import SamplingParams, ServedModel, render_prompt
from ..training.splits import hash_bucket
from .call_cache import CallCache
from .operations import OPERATION_NAMES, REWRITE_PREFIX, clean_rewrite, rewrite_request
from .reviewer import InformationGainReviewer
from .state import ChainState, encode, state_key

if TYPE_CHECKING:
    from .instructor import InstructorSettings


@dataclass(frozen=True)
class StepResult:
    operation: str
    before: str
    after: str
    reward: float
    p_differs: float | None
    rule: str | None
    rewrite_cached: bool
    review_cached: bool
    generation_tokens: int
    hit_token_limit: bool


class EvolutionStepper:
    """Applies operations with `rewriter` and judges them with `reviewer`. Sampling, when on, is
    seeded per step (`seed` + step): the arms of a comparison see the same decoding seeds."""

    def __init__(
        self,
        rewriter: ServedModel,
        reviewer: InformationGainReviewer,
        params: SamplingParams,
        batch_size: int,
        seed: int,
        cache: CallCache | None = None,
    ):
        self.rewriter, self.reviewer, self.params = rewriter, reviewer, params
        self.batch_size, self.seed, self.cache = batch_size, seed, cache
        self.model_calls = 0  # rewrites generated (cache hits excluded)

    def __call__(self, befores: Sequence[str], operations: Sequence[str], step: int) -> list[StepResult]:
        prompts = [
            render_prompt(self.rewriter.tokenizer, rewrite_request(op, b), REWRITE_PREFIX)
            for b, op in zip(befores, operations, strict=True)
        ]
        seed = self.seed + step if self.params.do_sample else None
        keys = [
            CallCache.key("rewrite", self.rewriter.provenance.columns(), p, self.params.as_dict(), seed)
            for p in prompts
        ]
        known = self.cache.get_many(keys) if self.cache else {}
        todo = list(dict.fromkeys(k for k in keys if k not in known))
        if todo:
            by_key = dict(zip(keys, prompts))
            with self.rewriter.for_generation() as model:
                # The rewrite is the reply's first line: each row stops there.
                gens = model.generate(
                    [by_key[k] for k in todo], self.params, self.batch_size, seed, stop_after_first_line=True
                )
            self.model_calls += len(todo)
            fresh = {k: [g.text, g.n_tokens, g.hit_token_limit] for k, g in zip(todo, gens)}
            if self.cache:
                self.cache.put_many(fresh)
            known = {**known, **fresh}
        new = set(todo)
        afters = [clean_rewrite(known[k][0]) for k in keys]
        reviews = self.reviewer.review(list(befores), afters)
        return [
            StepResult(op, b, a, r.reward, r.p_differs, r.rule, k not in new, r.cached, known[k][1], known[k][2])
            for b, op, a, r, k in zip(befores, operations, afters, reviews, keys)
        ]


def build_stepper(
    rewriter: ServedModel,
    reviewer_model: ServedModel,
    settings: InstructorSettings,
    batch_size: int,
    scoring_batch_size: int,
    cache: CallCache | None,
) -> tuple[EvolutionStepper, InformationGainReviewer]:
    """The stepper and its frozen reviewer with the instructor's sampling, decoding seed and reviewer
    rule: the same in training, in the comparison and for the evolved instructions."""
    reviewer = InformationGainReviewer(reviewer_model, scoring_batch_size, settings.near_copy_rouge_l, cache)
    return EvolutionStepper(rewriter, reviewer, settings.sampling_params(), batch_size, settings.seed, cache), reviewer


# (the chain's state, the chain's random generator) -> next operation index
Chooser = Callable[[ChainState, np.random.Generator], int]


@dataclass(frozen=True)
class ChainLink:
    """One step of one chain: which arm, from which seed task, at which step, from which state."""

    arm: str
    seed_id: str
    seed_instruction: str
    step: int  # 1-based
    state: str  # state_key of the state the operation was chosen in
    result: StepResult


def transition_row(link: ChainLink) -> dict:
    """A row of teams_policy_comparison (the columns of teams_policy_transitions' steps, with the arm)."""
    return dict(
        arm=link.arm,
        seed_id=link.seed_id,
        seed_instruction=link.seed_instruction,
        step=link.step,
        state=link.state,
        **asdict(link.result),
    )


def chain_rng(seed: int, seed_id: str) -> np.random.Generator:
    """The action generator of one chain: the same for every arm run on the same seed instruction."""
    return np.random.default_rng([seed, hash_bucket(seed_id, "teams-chain")])


def run_chains(
    stepper: EvolutionStepper,
    seeds: Sequence[tuple[str, str]],
    choosers: dict[str, Chooser],
    horizon: int,
    seed: int,
    operations: Sequence[str] = OPERATION_NAMES,
    progress=None,
    row: Callable[[ChainLink], dict] = transition_row,
) -> list[dict]:
    """`horizon` operations from each (seed id, instruction) for each chooser ("arm"), all chains
    in lockstep (one batched step for every arm and seed); one row per step, in the columns of the
    table it goes to (`row`: teams_policy_comparison's by default). Every arm's chain on a seed
    draws from the same generator, so the arms differ only in how they choose."""
    chains = [(arm, sid, text, choose) for arm, choose in choosers.items() for sid, text in seeds]
    rngs = [chain_rng(seed, sid) for _, sid, _, _ in chains]
    states = [ChainState(None, 0, False, text) for _, _, text, _ in chains]
    rows = []
    for step in range(horizon):
        actions = [c[3](state, rng) for c, state, rng in zip(chains, states, rngs)]
        results = stepper([s.text for s in states], [operations[a] for a in actions], step)
        for (arm, sid, seed_text, _), state, result in zip(chains, states, results):
            rows.append(row(ChainLink(arm, sid, seed_text, step + 1, state_key(state, list(operations)), result)))
        # A rewrite the rules rejected leaves the instruction as it was (as in the environment).
        states = [
            ChainState(a, step + 1, r.reward <= 0, r.after if r.reward > 0 else r.before)
            for a, r in zip(actions, results)
        ]
        if progress:
            progress(step + 1, horizon)
    return rows


def uniform_chooser(n_operations: int) -> Chooser:
    return lambda state, rng: int(rng.integers(n_operations))


def fixed_chooser(index: int) -> Chooser:
    return lambda state, rng: index


def policy_chooser(probabilities: Callable[[np.ndarray], np.ndarray], n_operations: int, horizon: int) -> Chooser:
    """Samples from the policy's action distribution in the chain's state; `probabilities` maps a
    batch of observations (state.encode) to a batch of distributions."""

    def choose(state: ChainState, rng: np.random.Generator) -> int:
        p = np.asarray(probabilities(encode(state, n_operations, horizon)[None, :])[0], dtype=np.float64)
        return int(rng.choice(n_operations, p=p / p.sum()))  # float32 rows sum to 1 only nearly

    return choose
