"""The held-out evaluation tasks (SuperNI task-file format), their loader, prompt and metric."""

import json

import pytest

from refine_af_pipeline.evaluation.tasks import (
    TaskFileError,
    best_rouge_l,
    evaluation_items,
    first_line,
    load_task_file,
    load_tasks,
    mean_by_task,
)
from refine_af_pipeline.instructions.rouge import DEFAULT_THRESHOLD, RougeDeduplicator, rouge_l
from refine_af_pipeline.instructions.seeds import load_seed_tasks
from refine_af_pipeline.llm.prompts import evaluation_prompt

pytestmark = pytest.mark.graph

# The seed pool's task types, and the built-in tasks of each (every task in exactly one type).
TASK_TYPES = {
    "classification": ["e01", "e10", "e21", "e22", "e23", "e24", "e25", "e26", "e29", "e30", "e31", "e64"],
    "extraction": ["e08", "e11", "e32", "e33", "e39", "e40", "e42", "e63"],
    "rewriting": ["e02", "e04", "e09", "e12", "e34", "e35", "e36", "e37", "e38", "e41"],
    "generation": ["e05", "e13", "e14", "e20", "e58", "e60", "e61", "e62"],
    "reasoning": ["e03", "e06", "e17", "e18", "e27", "e28", "e46", "e49", "e51"],
    "arithmetic": ["e07", "e15", "e19", "e43", "e44", "e45", "e47", "e48", "e50", "e52", "e53"],
    "coding": ["e16", "e54", "e55", "e56"],
    "knowledge": ["e57", "e59"],
}


def test_builtin_set_has_60_tasks_of_10_instances_with_references():
    tasks = load_tasks()
    assert len(tasks) >= 60
    assert all(len(t.instances) >= 10 for t in tasks), {t.name: len(t.instances) for t in tasks}
    assert all(inst.references and all(r.strip() for r in inst.references) for t in tasks for inst in t.instances)
    ids = [inst.id for t in tasks for inst in t.instances]
    assert len(ids) == len(set(ids))


def test_builtin_tasks_cover_the_seed_task_types():
    names = {t.name.split("_")[1]: t.name for t in load_tasks()}
    typed = [code for codes in TASK_TYPES.values() for code in codes]
    assert sorted(typed) == sorted(names), set(typed) ^ set(names)  # every task typed exactly once
    assert all(len(codes) >= 2 for codes in TASK_TYPES.values())


def test_builtin_tasks_are_disjoint_from_the_seeds_and_from_each_other():
    tasks = load_tasks()
    seeds = load_seed_tasks()
    # No definition is a near-duplicate (the pipeline's own ROUGE-L bar) of a seed instruction...
    seed_pool = RougeDeduplicator([s.instruction for s in seeds])
    worst = max((seed_pool.max_score(t.definition), t.name) for t in tasks)
    assert worst[0][0] <= DEFAULT_THRESHOLD, worst
    # ...nor of another task's definition...
    for k, a in enumerate(tasks):
        for b in tasks[k + 1 :]:
            assert rouge_l(a.definition, b.definition) <= DEFAULT_THRESHOLD, (a.name, b.name)
    # ...and no evaluation input repeats a seed's instance input or another evaluation input.
    seed_inputs = RougeDeduplicator([i.input for s in seeds for i in s.instances if i.input.strip()])
    inputs = [inst.input for t in tasks for inst in t.instances]
    assert len(inputs) == len(set(inputs))
    assert max(seed_inputs.max_score(x)[0] for x in inputs) <= DEFAULT_THRESHOLD


def test_malformed_task_file_names_the_file(tmp_path):
    bad = tmp_path / "task_bad.json"
    bad.write_text('{"Definition": ["x"],\n "Instances": [\n}', encoding="utf-8")
    with pytest.raises(TaskFileError, match=r"task_bad.json:3: malformed JSON"):
        load_task_file(bad)
    no_refs = tmp_path / "task_norefs.json"
    no_refs.write_text(json.dumps({"Definition": ["d"], "Instances": [{"input": "a", "output": []}]}))
    with pytest.raises(TaskFileError, match=r"task_norefs.json: Instances\[0\]"):
        load_task_file(no_refs)
    no_definition = tmp_path / "task_nodef.json"
    no_definition.write_text(json.dumps({"Instances": [{"input": "a", "output": ["b"]}]}))
    with pytest.raises(TaskFileError, match=r"task_nodef.json: 'Definition'"):
        load_task_file(no_definition)
    latin1 = tmp_path / "task_latin1.json"
    latin1.write_bytes('{"Definition": ["caf\u00e9"]}'.encode("latin-1"))
    with pytest.raises(TaskFileError, match=r"task_latin1.json:1: not valid UTF-8"):
        load_task_file(latin1)


def test_a_user_task_dir_loads_and_one_bad_file_in_it_is_named(tmp_path):
    good = {
        "Definition": ["Answer with the capital city."],
        "Positive Examples": [],
        "Instances": [
            {"id": "c-1", "input": "France", "output": ["Paris"]},
            {"id": "c-2", "input": "Japan", "output": "Tokyo"},
        ],
    }
    (tmp_path / "task001_capitals.json").write_text(json.dumps(good))
    [task] = load_tasks(tmp_path)
    assert task.name == "task001_capitals" and task.definition == "Answer with the capital city."
    assert [i.references for i in task.instances] == [("Paris",), ("Tokyo",)]
    (tmp_path / "task002_broken.json").write_text('{"Definition": "d", "Instances": 3}')
    with pytest.raises(TaskFileError, match=r"task002_broken.json: 'Instances'"):
        load_tasks(tmp_path)
    with pytest.raises(TaskFileError, match="not found"):
        load_tasks(tmp_path / "nowhere")


def test_prompt_is_definition_then_input_then_output():
    prompt = evaluation_prompt("  Name the colour of the sky. ", " On a clear day ")
    assert prompt == "Definition: Name the colour of the sky.\n\nInput: On a clear day\nOutput:"


def test_rouge_l_is_the_best_over_references_on_hand_cases():
    # LCS "the cat sat" (3 of 3 prediction tokens, 3 of 6 reference tokens): P=1, R=0.5, F=2/3.
    assert rouge_l("the cat sat on the mat", "the cat sat") == pytest.approx(2 / 3)
    assert best_rouge_l("the cat sat", ("a dog barked", "the cat sat on the mat")) == pytest.approx(2 / 3)
    assert best_rouge_l("positive", ("negative", "positive")) == 1.0
    assert best_rouge_l("Positive!", ("positive",)) == 1.0  # rouge-score lower-cases and drops punctuation
    assert best_rouge_l("", ("positive",)) == 0.0
    assert best_rouge_l("blue sky", ("red", "green")) == 0.0
    assert first_line("\n  blue sky \nmore text") == "blue sky"


def test_items_and_per_task_means(tmp_path):
    tasks = load_tasks()[:2]
    items = evaluation_items(tasks, 3)
    assert [t.name for t, _ in items] == [tasks[0].name] * 3 + [tasks[1].name] * 3
    assert len(evaluation_items(tasks, 0)) == sum(len(t.instances) for t in tasks)
    means = mean_by_task(items, [1.0, 0.0, 0.5, 0.2, 0.2, 0.2])
    assert means == pytest.approx({tasks[0].name: 0.5, tasks[1].name: 0.2})


def test_stopping_after_the_first_line_keeps_that_line(tiny_model_dir):
    from refine_af_pipeline.llm.backend import SamplingParams
    from refine_af_pipeline.llm.generation import generate
    from resources import LanguageModelResource

    model, tokenizer, _, _ = LanguageModelResource(model=str(tiny_model_dir), device="cpu").load()
    items = evaluation_items(load_tasks()[:4], 2)
    prompts = [evaluation_prompt(t.definition, inst.input) for t, inst in items]
    params = SamplingParams(max_new_tokens=24, do_sample=False)
    full = generate(model, tokenizer, prompts, params, batch_size=4)
    stopped = generate(model, tokenizer, prompts, params, batch_size=4, stop_after_first_line=True)
    assert [first_line(g.text) for g in stopped] == [first_line(g.text) for g in full]
    ended = [g for g in full if "\n" in g.text.lstrip()]
    assert ended, "the tiny model wrote no second line: the test would not exercise the stop"
    assert sum(g.n_tokens for g in stopped) < sum(g.n_tokens for g in full)
