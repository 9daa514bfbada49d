"""Column descriptions are declared per table, beside the asset that writes it (assets/columns.py);
these checks need no materialization (test_pipeline_tiny checks the stored tables against them)."""

import pytest

from assets.columns import SHARED, column_description, declared
from assets.instance_pairs import STAGING_TABLES
from refine_af_pipeline.definitions import defs
from resources.batch_ledger import BATCHES, PLANS

pytestmark = pytest.mark.unit


def _asset_keys() -> set[str]:
    return {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}


def test_every_declared_table_is_an_asset_or_ledger_table():
    assets = _asset_keys()
    stored = assets | {PLANS, BATCHES} | set(STAGING_TABLES.values())

    def known(name: str) -> bool:
        # A metadata table that is not stored is named <asset>/<metadata key>.
        table, _, view = name.partition("/")
        return table in (assets if view else stored)

    tables = declared()
    assert not [t for t in tables if not known(t)]
    assert not stored - set(tables)  # every asset and ledger table declares its own columns


def test_no_table_restates_a_shared_description():
    restated = [
        (table, column)
        for table, columns in declared().items()
        for column, text in columns.items()
        if SHARED.get(column) == text
    ]
    assert not restated


def test_every_description_is_one_nonempty_line():
    texts = [(t, c, d) for t, cs in declared().items() for c, d in cs.items()] + [("", c, d) for c, d in SHARED.items()]
    assert not [(t, c) for t, c, d in texts if not d.strip() or "\n" in d]


def test_reward_means_what_its_table_says():
    meanings = {
        table: column_description(table, "reward")
        for table in ("instance_output_pairs", "rl_refined_policy", "teams_policy_transitions")
    }
    assert all(meanings.values()), meanings
    assert len(set(meanings.values())) == 3, meanings
    assert "step" in meanings["rl_refined_policy"] and "reviewer" in meanings["teams_policy_transitions"]


def test_a_table_falls_back_to_the_shared_description():
    assert column_description("evaluation", "run_id") == SHARED["run_id"]
    assert column_description("evaluation", "model_id") == SHARED["model_id"]
    assert column_description("instance_output_pairs", "run_id") != SHARED["run_id"]  # its own line first
    assert column_description("evaluation", "no_such_column") == ""
