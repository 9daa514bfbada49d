"""The decode loop: rows leave the batch as they end and waiting prompts take their place, yet every
prompt gets the text it gets alone (greedy, or sampled with its own seed), in prompt order."""

import pytest

from refine_af_pipeline.llm.backend import SamplingParams, render_prompt, row_seed
from refine_af_pipeline.llm.generation import _generate_with_transformers, budget_batches, generate
from refine_af_pipeline.llm.prompts import INSTANCE_PREFIX, instance_prompt
from refine_af_pipeline.llm.retry import Backoff
from resources import LanguageModelResource

pytestmark = pytest.mark.graph

INSTRUCTIONS = [
    "Plan a trip",
    "Explain rivers to a child who asks why water flows downhill every single day",
    "List three habits",
    "Compare two bridges and say which one is older and which one is longer",
    "Rewrite this",
    "Suggest a recipe for a quiet evening",
    "Describe the market",
    "Outline a budget for a student who lives in a city and walks to school",
]
SAMPLED = SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.95, do_sample=True)
GREEDY = SamplingParams(max_new_tokens=24, do_sample=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer, _, _ = LanguageModelResource(model=str(tiny_model_dir), device="cpu").load()
    prompts = [render_prompt(tokenizer, instance_prompt(i), INSTANCE_PREFIX) for i in INSTRUCTIONS]
    return model, tokenizer, prompts


class RowCounter:
    """Records the rows of every forward pass of `model` (prefills and decode steps)."""

    def __init__(self, model):
        self.model, self.real, self.rows = model, model.forward, []

    def __enter__(self):
        def counted(*args, **kwargs):
            self.rows.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1]))
            return self.real(*args, **kwargs)

        self.model.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.forward


def test_greedy_text_is_the_text_each_prompt_gets_alone_and_from_model_generate(tiny):
    model, tokenizer, prompts = tiny
    alone = [generate(model, tokenizer, [p], GREEDY, batch_size=1)[0] for p in prompts]
    assert len({g.text for g in alone}) > 1, "the tiny model answers every prompt alike: order would not show"
    reference = _generate_with_transformers(model, tokenizer, prompts, GREEDY, 8, 0, None, None, False)
    assert [g.text for g in reference] == [g.text for g in alone]
    assert [(g.n_tokens, g.hit_token_limit) for g in reference] == [(g.n_tokens, g.hit_token_limit) for g in alone]
    for batch_size in (3, 8):
        assert generate(model, tokenizer, prompts, GREEDY, batch_size=batch_size) == alone, batch_size


def test_a_sampled_row_depends_on_its_own_seed_only(tiny):
    model, tokenizer, prompts = tiny
    together = generate(model, tokenizer, prompts, SAMPLED, batch_size=3, seed=11)
    alone = [
        generate(model, tokenizer, [p], SAMPLED, batch_size=1, row_seeds=[row_seed(11, k)])[0]
        for k, p in enumerate(prompts)
    ]
    assert together == alone
    assert generate(model, tokenizer, prompts, SAMPLED, batch_size=8, seed=11) == together
    assert generate(model, tokenizer, prompts, SAMPLED, batch_size=8, seed=12) != together


def test_rows_leave_as_they_end_and_waiting_prompts_join(tiny):
    model, tokenizer, prompts = tiny
    with RowCounter(model) as counter:
        gens = generate(model, tokenizer, prompts, SAMPLED, batch_size=4, seed=3)
    steps = [rows for rows, width in counter.rows if width == 1]
    assert max(steps) == 4  # never more rows than batch_size
    # Prompts joined a running batch: a later prefill is followed by a decode step with more rows
    # than it prefilled (the rows that were already running).
    calls = counter.rows
    assert any(
        calls[i][1] > 1 and calls[i + 1][1] == 1 and calls[i + 1][0] > calls[i][0] for i in range(1, len(calls) - 1)
    )
    # Decode steps computed as many rows as there are generated tokens (plus one per row for its
    # end-of-sequence step): nothing for rows that had ended.
    ended = sum(not g.hit_token_limit for g in gens)
    assert sum(steps) == sum(g.n_tokens for g in gens) + ended
    assert len(steps) < sum(g.n_tokens for g in gens) / 2  # and rows ran side by side


def test_a_token_budget_runs_long_prompts_in_fewer_rows(tiny):
    model, tokenizer, prompts = tiny
    widest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + GREEDY.max_new_tokens
    with RowCounter(model) as counter:
        gens = generate(model, tokenizer, prompts, GREEDY, batch_size=8, max_batch_tokens=2 * widest)
    assert max(rows for rows, width in counter.rows if width == 1) <= 2
    assert gens == generate(model, tokenizer, prompts, GREEDY, batch_size=8)


def test_stopping_after_the_first_line_keeps_that_line(tiny):
    model, tokenizer, prompts = tiny
    params = SamplingParams(max_new_tokens=40, do_sample=False)
    full = generate(model, tokenizer, prompts, params, batch_size=4)
    short = generate(model, tokenizer, prompts, params, batch_size=4, stop_after_first_line=True)
    first_line = lambda text: text.lstrip().split("\n")[0]  # noqa: E731
    assert [first_line(g.text) for g in short] == [first_line(g.text) for g in full]
    assert sum(g.n_tokens for g in short) < sum(g.n_tokens for g in full)


def test_a_transient_error_in_a_decode_step_is_retried_on_the_cache_as_it_was(tiny):
    model, tokenizer, prompts = tiny
    expected = generate(model, tokenizer, prompts, SAMPLED, batch_size=4, seed=5)
    real, calls = model.forward, []

    def fails_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) in (6, 7):  # two decode steps in, after the cache has grown
            real(*args, **kwargs)  # the cache is extended, then the pass fails
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    model.forward = fails_midway
    try:
        got = generate(
            model, tokenizer, prompts, SAMPLED, batch_size=4, seed=5, backoff=Backoff(attempts=3, first_delay_s=0)
        )
    finally:
        del model.forward
    assert got == expected


def test_row_seeds_of_successive_calls_do_not_collide():
    # Stages seed batch b with seed + b; rows of neighbouring batches must not share a stream.
    seeds = [row_seed(seed, k) for seed in range(100, 140) for k in range(512)]
    assert len(set(seeds)) == len(seeds)


def test_budget_batches_cut_by_rows_and_by_positions():
    lengths = [5, 50, 7, 48, 6, 20]
    assert budget_batches(lengths, 3) == [[1, 3, 5], [2, 4, 0]]
    # 100 positions: two 50-token rows, then 20 x 4 rows, then the rest.
    assert budget_batches(lengths, 8, 100) == [[1, 3], [5, 2, 4, 0]]
    assert budget_batches(lengths, 8, 100, extra_tokens=10) == [[1], [3], [5, 2, 4], [0]]
    assert budget_batches([500, 3], 8, 100) == [[0], [1]]  # a text over the budget goes alone
