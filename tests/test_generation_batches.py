"""Generation batches: any batch size gives the outputs in prompt order, and in the generation
stages a stage's batch size sets the crash-resume batches while rows keep their provenance."""

import json

import dagster as dg
import duckdb
import pytest
from pipeline_helpers import STAGES_BEFORE_RL, materialize, smallest_run_config

from refine_af_pipeline.instructions.instances import InstancePairsSettings
from refine_af_pipeline.llm.backend import SamplingParams, render_prompt
from refine_af_pipeline.llm.generation import generate, length_sorted_batches
from refine_af_pipeline.llm.prompts import INSTANCE_PREFIX, instance_prompt
from resources import LanguageModelResource

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


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer, _, _ = LanguageModelResource(model=str(tiny_model_dir), device="cpu").load()
    return model, tokenizer


@pytest.mark.graph
def test_length_sorted_batches_cover_every_index_once_longest_first(tiny):
    _, tokenizer = tiny
    texts = [i * (k % 3 + 1) for k, i in enumerate(INSTRUCTIONS)]
    batches = length_sorted_batches(tokenizer, texts, 3)
    assert [len(b) for b in batches] == [3, 3, 2]
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    lengths = [len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]) for b in batches for i in b]
    assert lengths == sorted(lengths, reverse=True)
    assert length_sorted_batches(tokenizer, texts[:2], 8) == [[0, 1]]  # one batch: order as given


@pytest.mark.graph
def test_any_batch_size_returns_the_outputs_in_prompt_order(tiny):
    model, tokenizer = tiny
    prompts = [render_prompt(tokenizer, instance_prompt(i), INSTANCE_PREFIX) for i in INSTRUCTIONS]
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    one_by_one = [generate(model, tokenizer, [p], params, batch_size=1)[0].text for p in prompts]
    assert len(set(one_by_one)) > 1, "the tiny model answers every prompt alike: order would not show"
    for batch_size in (3, 8, 64):
        batched = [g.text for g in generate(model, tokenizer, prompts, params, batch_size=batch_size)]
        assert batched == one_by_one, batch_size


@pytest.mark.slow  # seven stages on the tiny model, about a minute
def test_a_stage_batch_size_sets_the_ledger_batches_and_rows_keep_their_prompts(tiny_model_dir, tmp_path):
    config = smallest_run_config(
        bootstrap_instructions={"num_prompts": 8, "classification_prompts": 1},
        instance_output_pairs={"max_instructions": 5, "instances_per_instruction": 2, "replicates": 1},
    )
    # Each stage's own config sets its batch; the others take the resource's batch_size (2).
    config["bootstrap_instructions"]["generation_batch_size"] = 3
    config["selfinstruct_instance_pairs"]["generation_batch_size"] = 4
    result = materialize(
        tmp_path,
        str(tiny_model_dir),
        config,
        batch_size=2,
        selection=[*STAGES_BEFORE_RL, "selfinstruct_instance_pairs"],
    )
    assert result.success
    with duckdb.connect(str(tmp_path / "refine_af.duckdb"), read_only=True) as conn:
        batches = conn.execute(
            "SELECT asset, batch_index, inputs, rows_written FROM generation_plan_batches ORDER BY asset, batch_index"
        ).pl()
        raw = conn.execute(
            "SELECT prompt_index, prompt_example_ids, position_in_response FROM raw_instructions "
            "ORDER BY prompt_index, position_in_response"
        ).pl()
        pairs = conn.execute("SELECT instance_id, instruction_id, instruction FROM selfinstruct_instance_pairs").pl()
    raw_batches = [json.loads(i) for i in batches.filter(batches["asset"] == "raw_instructions")["inputs"]]
    assert [len(b) for b in raw_batches] == [3, 3, 2]
    planned = [p for b in raw_batches for p in b]
    # Every row's provenance is the prompt the plan put at its index.
    for row in raw.filter(raw["position_in_response"] == 0).iter_rows(named=True):
        assert json.loads(row["prompt_example_ids"]) == planned[row["prompt_index"]]["example_ids"]
    assert sorted(set(raw["prompt_index"])) == list(range(8))
    instance_batches = [
        json.loads(i) for i in batches.filter(batches["asset"] == "selfinstruct_instance_pairs")["inputs"]
    ]
    assert [len(b) for b in instance_batches] == [4, 4, 2]
    planned_items = [item for b in instance_batches for item in b]
    assert pairs["instance_id"].to_list() == [i["instance_id"] for i in planned_items]  # plan order
    assert pairs["instruction"].to_list() == [i["instruction"] for i in planned_items]


@pytest.mark.graph
def test_bad_batch_settings_are_refused_with_the_setting_named(tmp_path):
    from refine_af_pipeline.training.rl import RLSettings, train_policy

    with pytest.raises(ValueError, match="batch_size"):
        LanguageModelResource(batch_size=0)
    with pytest.raises(ValueError, match="generation_batch_size"):
        InstancePairsSettings(generation_batch_size=-1)
    # The old per-step map is gone, and refused rather than silently ignored.
    with pytest.raises(dg.DagsterInvalidConfigError, match='unexpected config entry "stage_batch_sizes"'):
        LanguageModelResource(stage_batch_sizes={"evaluation": 32})
    with pytest.raises(ValueError, match=r"train_batch_size \(5\) must divide prompts_per_step x group_size \(12\)"):
        train_policy(
            None,
            None,
            ["an instruction"],
            None,
            RLSettings(prompts_per_step=3, group_size=4, train_batch_size=5),
            tmp_path,
            "cpu",
        )
