"""Stage 0: the human-written seed tasks."""

import json

import dagster as dg
import polars as pl

from refine_af_pipeline.instructions.pools import seed_set_digest
from refine_af_pipeline.instructions.seeds import SeedPoolSettings, load_seed_tasks
from resources import Warehouse

from . import groups
from .columns import declare
from .metadata import table_metadata

SEED_POOL = "seed_pool"
COLUMNS = declare(
    {
        SEED_POOL: {
            "id": "seed task id from the seed file",
            "name": "seed task name from the seed file",
            "instances": "the seed task's input/output instances, as a JSON list",
            "first_input": "input of the seed task's first instance (empty when it takes none)",
            "first_output": "output of the seed task's first instance",
            "is_classification": "whether the task is classification (from the seed file)",
            "source": "file the seed pool was read from (built-in or the configured seed_file)",
            "seed_set_digest": "sha256 of the seed tasks' content (ids, instructions, instances, labels)",
        }
    }
)


class SeedPoolConfig(dg.Config, SeedPoolSettings):
    """Run config of `seed_pool`: the fields of SeedPoolSettings (refine_af_pipeline/instructions/seeds.py)."""


@dg.asset(group_name=groups.SHARED_POOL, kinds={"duckdb", "polars"})
def seed_pool(context: dg.AssetExecutionContext, config: SeedPoolConfig, warehouse: Warehouse) -> dg.MaterializeResult:
    """The human-written seed tasks that bootstrap instruction generation. A user file replaces the
    built-in pool; it is validated whole before anything is written, so a bad file leaves the
    previous table untouched. Their content digest names the instruction pool they start."""
    tasks = load_seed_tasks(config.seed_file)
    digest = seed_set_digest(tasks)
    df = pl.DataFrame(
        {
            "id": [t.id for t in tasks],
            "name": [t.name for t in tasks],
            "instruction": [t.instruction for t in tasks],
            "instances": [json.dumps([vars(i) for i in t.instances]) for t in tasks],
            "first_input": [t.instances[0].input for t in tasks],
            "first_output": [t.instances[0].output for t in tasks],
            "is_classification": [t.is_classification for t in tasks],
            "source": [t.source for t in tasks],
            "seed_set_digest": [digest] * len(tasks),
            "run_id": [context.run_id] * len(tasks),
        }
    )
    warehouse.write_table(SEED_POOL, df)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["id", "instruction", "is_classification"], table=SEED_POOL),
            "classification_share": float(df["is_classification"].mean()),
            "source": tasks[0].source,
            "seed_set_digest": digest,
        }
    )
