import random

import pytest

from refine_af_pipeline.instructions.bootstrap import PoolItem, sample_prompt
from refine_af_pipeline.llm.prompts import (
    bootstrap_continuation_prefix,
    bootstrap_prompt,
    evaluation_prompt,
    sft_prompt,
)

pytestmark = pytest.mark.unit

SEEDS = [PoolItem(f"s{k}", f"Seed instruction number {k}", k % 5 == 0) for k in range(30)]
MACHINE = [PoolItem(f"m{k}", f"Machine instruction {k}", k % 2 == 0) for k in range(5)]


def test_bootstrap_prompt_numbers_examples_and_leaves_next_open():
    text = bootstrap_prompt(["Do  one\nthing", "Do another"])
    assert text == "Come up with a series of tasks:\n1. Do one thing\n2. Do another\n"
    assert bootstrap_continuation_prefix(8) == "9."


def test_sample_prompt_uses_two_machine_and_six_seed_examples():
    prompt = sample_prompt(SEEDS, MACHINE, random.Random(0))
    assert len(prompt.example_ids) == 8
    assert sum(i.startswith("m") for i in prompt.example_ids) == 2
    assert len(set(prompt.example_ids)) == 8
    for line_no, example_id in enumerate(prompt.example_ids, start=1):
        pool = {p.id: p for p in SEEDS + MACHINE}
        assert f"{line_no}. {pool[example_id].instruction}" in prompt.text


def test_all_seed_examples_while_machine_pool_is_empty():
    prompt = sample_prompt(SEEDS, [], random.Random(1))
    assert all(i.startswith("s") for i in prompt.example_ids) and len(prompt.example_ids) == 8


def test_classification_variant_only_uses_classification_examples():
    prompt = sample_prompt(SEEDS, MACHINE, random.Random(2), classification=True)
    pool = {p.id: p for p in SEEDS + MACHINE}
    assert all(pool[i].is_classification for i in prompt.example_ids)
    assert prompt.text.startswith("Come up with a series of classification tasks")


def test_sft_and_evaluation_layouts():
    assert sft_prompt("Add", "") == "### Instruction:\nAdd\n\n### Response:\n"
    assert "### Input:\n2 3\n" in sft_prompt("Add", "2 3")
    assert evaluation_prompt("Say yes.", "Q") == "Definition: Say yes.\n\nInput: Q\nOutput:"
