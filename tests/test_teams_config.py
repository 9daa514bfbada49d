"""Bad TeaMs-RL settings fail the step before any model is opened, naming the field, and write nothing."""

import duckdb
import pytest
from pipeline_helpers import materialize

from resources import LanguageModelResource

pytestmark = pytest.mark.graph

BAD = [
    ({"operations": ["breadth", "paraphrase"]}, "paraphrase"),
    ({"episodes_per_update": 0}, "episodes_per_update"),
    ({"horizon": 0}, "horizon"),
    ({"updates": 0}, "updates"),
]


@pytest.mark.parametrize("config, named", BAD)
def test_bad_instructor_config_fails_before_a_model_opens(config, named, tmp_path, monkeypatch, tiny_model_dir):
    opened = []
    monkeypatch.setattr(LanguageModelResource, "open_models", lambda self, adapters: opened.append(adapters))
    materialize(tmp_path, str(tiny_model_dir), {}, selection=["seed_pool"])
    with pytest.raises(Exception) as err:
        materialize(
            tmp_path,
            str(tiny_model_dir),
            {"teams_operation_policy": config},
            selection=["teams_operation_policy", "teams_policy_transitions"],
        )
    assert named in str(err.value)
    assert opened == []
    with duckdb.connect(str(tmp_path / "refine_af.duckdb"), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("SHOW TABLES").fetchall()}
    assert not {"teams_operation_policy", "teams_policy_transitions"} & tables
