import json

import pytest

from refine_af_pipeline.evaluation import TaskFileError, best_rouge_l, first_line, load_task_file, load_tasks
from refine_af_pipeline.seeds import load_seed_tasks


def test_builtin_tasks_load_and_are_disjoint_from_seeds():
    tasks = load_tasks()
    assert len(tasks) >= 20
    assert all(len(t.instances) == 10 for t in tasks)
    seed_instructions = {t.instruction for t in load_seed_tasks()}
    assert not seed_instructions & {t.definition for t in tasks}


def test_malformed_task_file_names_the_file(tmp_path):
    bad = tmp_path / "task_bad.json"
    bad.write_text('{"Definition": ["x"],\n "Instances": [\n}', encoding="utf-8")
    with pytest.raises(TaskFileError, match=r"task_bad.json:3: malformed JSON"):
        load_task_file(bad)
    no_refs = tmp_path / "task_norefs.json"
    no_refs.write_text(json.dumps({"Definition": ["d"], "Instances": [{"input": "a", "output": []}]}))
    with pytest.raises(TaskFileError, match=r"task_norefs.json: Instances\[0\]"):
        load_task_file(no_refs)


def test_best_over_references_and_first_line():
    assert best_rouge_l("positive", ("negative", "positive")) == 1.0
    assert first_line("\n  blue sky \nmore text") == "blue sky"
