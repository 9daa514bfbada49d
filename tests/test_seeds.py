import json

import pytest

from refine_af_pipeline.instructions.seeds import SeedFileError, load_seed_tasks

pytestmark = pytest.mark.unit


def test_builtin_pool_has_175_diverse_tasks():
    tasks = load_seed_tasks()
    assert len(tasks) == 175
    assert len({t.id for t in tasks}) == 175
    share = sum(t.is_classification for t in tasks) / len(tasks)
    assert 0.10 <= share <= 0.20
    assert all(t.instances and t.instances[0].output.strip() for t in tasks)


def _write(tmp_path, text, name="seeds.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(SeedFileError, match="nope.jsonl: seed file not found"):
        load_seed_tasks(tmp_path / "nope.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps({"id": "a", "instruction": "Do a thing well", "instances": [{"input": "", "output": "x"}]})
    path = _write(tmp_path, good + "\n" + good.replace('"a"', '"b"') + "\n{not json\n")
    with pytest.raises(SeedFileError, match=r"seeds.jsonl:3: malformed JSON"):
        load_seed_tasks(path)


def test_missing_field_names_the_field_and_line(tmp_path):
    path = _write(tmp_path, json.dumps({"id": "a", "instances": [{"input": "", "output": "x"}]}) + "\n")
    with pytest.raises(SeedFileError, match=r"seeds.jsonl:1: missing field 'instruction'"):
        load_seed_tasks(path)


def test_wrong_type_and_duplicate_ids(tmp_path):
    bad = _write(
        tmp_path,
        json.dumps({"id": "a", "instruction": "Do it now", "instances": [], "is_classification": False}) + "\n",
    )
    with pytest.raises(SeedFileError, match="instances"):
        load_seed_tasks(bad)
    rec = json.dumps({"id": "a", "instruction": "Do it now please", "instances": [{"input": "", "output": "y"}]})
    with pytest.raises(SeedFileError, match="duplicate task id 'a'"):
        load_seed_tasks(_write(tmp_path, rec + "\n" + rec + "\n", "dup.jsonl"))


def test_not_utf8_and_empty(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(SeedFileError, match=r"latin.jsonl:2: not valid UTF-8"):
        load_seed_tasks(path)
    with pytest.raises(SeedFileError, match="empty"):
        load_seed_tasks(_write(tmp_path, "\n\n", "empty.jsonl"))


def test_alpaca_json_is_accepted(tmp_path):
    path = _write(
        tmp_path,
        json.dumps(
            [
                {"instruction": "Name a colour of the sky", "input": "", "output": "Blue"},
                {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
            ]
        ),
        "alpaca.json",
    )
    tasks = load_seed_tasks(path)
    assert [t.instruction for t in tasks] == ["Name a colour of the sky", "Add the numbers"]
    assert tasks[1].instances[0].input == "2 and 3"
    assert tasks[0].source == str(path)


def test_alpaca_item_missing_output(tmp_path):
    path = _write(tmp_path, json.dumps([{"instruction": "x y z w", "input": ""}]), "alpaca.json")
    with pytest.raises(SeedFileError, match=r"alpaca.json: item 0: missing field 'output'"):
        load_seed_tasks(path)
