"""Bad seed and evaluation files at the asset level: the step fails with the file (and line) named,
and the table it would have replaced is left exactly as it was."""

import json

import duckdb
import polars as pl
import pytest
from pipeline_helpers import copy_data_dir, materialize

from refine_af_pipeline.evaluation.tasks import TaskFileError
from refine_af_pipeline.instructions.seeds import SeedFileError
from resources import Warehouse

pytestmark = pytest.mark.graph

GOOD_SEED = json.dumps(
    {"id": "s1", "instruction": "Name a colour of the sky", "instances": [{"input": "", "output": "Blue"}]}
)
GOOD_TASK = {
    "Definition": ["Answer with the capital city."],
    "Instances": [{"id": "c-1", "input": "France", "output": ["Paris"]}],
}


def _snapshot(data_dir, table: str) -> pl.DataFrame:
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return conn.execute(f"SELECT * FROM {table}").pl()


@pytest.fixture(scope="module")
def seeded_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    assert materialize(data_dir, "unused", {}, selection=["seed_pool"]).success
    # A previous evaluation result that a bad task folder must leave alone.
    Warehouse(database=str(data_dir / "refine_af.duckdb")).write_table(
        "evaluation", pl.DataFrame({"task": ["task_x"], "model": ["base"], "rouge_l": [0.5], "run_id": ["earlier"]})
    )
    return data_dir


@pytest.fixture
def data_dir(seeded_dir, tmp_path):
    """Each case materializes into a copy: one that wrote after all leaves the others' data alone."""
    return copy_data_dir(seeded_dir, tmp_path / "data")


SEED_CASES = {
    "missing": (None, r"missing.jsonl: seed file not found"),
    "empty": (b"", r"empty.jsonl: seed file is empty"),
    "blank_lines": (b"\n  \n\n", r"blank_lines.jsonl: seed file is empty"),
    "malformed_line": (
        (GOOD_SEED + "\n" + GOOD_SEED.replace("s1", "s2") + '\n{"id": "s3",\n').encode(),
        r"malformed_line.jsonl:3: malformed JSON",
    ),
    "missing_field": (
        (GOOD_SEED + "\n" + json.dumps({"id": "s2", "instances": [{"input": "", "output": "x"}]})).encode(),
        r"missing_field.jsonl:2: missing field 'instruction'",
    ),
    "wrong_type": (
        json.dumps(
            {
                "id": "s1",
                "instruction": "Do it now",
                "instances": [{"input": "", "output": "y"}],
                "is_classification": "yes",
            }
        ).encode(),
        r"wrong_type.jsonl:1: field 'is_classification' must be true or false",
    ),
    "output_not_string": (
        json.dumps({"id": "s1", "instruction": "Do it now", "instances": [{"input": "", "output": 4}]}).encode(),
        r"output_not_string.jsonl:1, instances\[0\]: field 'output' must be a string, got int",
    ),
    "not_utf8": ((GOOD_SEED + "\n").encode() + b'{"id": "caf\xe9"}\n', r"not_utf8.jsonl:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", SEED_CASES)
def test_bad_seed_file_names_file_and_line_and_writes_nothing(data_dir, tmp_path, case):
    content, message = SEED_CASES[case]
    path = tmp_path / f"{case}.jsonl"
    if content is not None:
        path.write_bytes(content)
    before = _snapshot(data_dir, "seed_pool")
    with pytest.raises(SeedFileError, match=message):
        materialize(data_dir, "unused", {"seed_pool": {"seed_file": str(path)}}, selection=["seed_pool"])
    assert _snapshot(data_dir, "seed_pool").equals(before)


TASK_CASES = {
    "no_folder": (None, r"no_folder: evaluation task directory not found"),
    "no_task_files": ({}, r"no_task_files: no \*.json task files"),
    "empty_file": ({"task_a.json": b""}, r"task_a.json: task file is empty"),
    "malformed_line": (
        {"task_a.json": b'{"Definition": ["d"],\n "Instances": [\n  {"input": "x", }\n]}'},
        r"task_a.json:3: malformed JSON",
    ),
    "missing_field": (
        {"task_a.json": json.dumps({"Instances": GOOD_TASK["Instances"]}).encode()},
        r"task_a.json: 'Definition' must be a non-empty string",
    ),
    "wrong_type": (
        {"task_a.json": json.dumps({**GOOD_TASK, "Instances": [{"input": "France", "output": 7}]}).encode()},
        r"task_a.json: Instances\[0\]: 'output' must be a non-empty list of reference strings",
    ),
    "not_utf8": (
        {"task_a.json": json.dumps(GOOD_TASK, indent=1).encode() + b"\n\xff"},
        r"task_a.json:\d+: not valid UTF-8",
    ),
    "one_bad_among_good": (
        {"task_a.json": json.dumps(GOOD_TASK).encode(), "task_b.json": b"[1, 2]"},
        r"task_b.json: expected a JSON object",
    ),
}


@pytest.mark.parametrize("case", TASK_CASES)
def test_bad_evaluation_task_file_names_the_file_and_writes_nothing(data_dir, tmp_path, case):
    files, message = TASK_CASES[case]
    folder = tmp_path / case
    if files is not None:
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
    before = _snapshot(data_dir, "evaluation")
    with pytest.raises(TaskFileError, match=message):
        materialize(
            data_dir,
            "embedded",
            {"evaluation": {"task_dir": str(folder)}},
            selection=["evaluation", "evaluation_predictions", "evaluation_summary"],
        )
    assert _snapshot(data_dir, "evaluation").equals(before)
