"""The final instruction data as files other tools read: Alpaca JSON, JSONL, parquet, HF datasets."""

import dagster as dg
import polars as pl

from refine_af_pipeline.exports import FORMAT_FILES, ExportSettings, export_rows, write_dataset_exports
from resources import ArtifactStore, Warehouse

from . import groups
from .columns import declare
from .instance_pairs import INSTANCE_PAIRS, SELFINSTRUCT_PAIRS
from .metadata import metadata_table, table_metadata
from .teams import EXPERT_PAIRS

EXPORTS = "instruction_dataset_exports"
# Exported dataset name -> the instance table whose kept rows it holds.
EXPORTED_TABLES = {
    "refine_af": INSTANCE_PAIRS,
    "self_instruct": SELFINSTRUCT_PAIRS,
    "teams_rl": EXPERT_PAIRS,
}
COLUMNS = declare(
    {
        EXPORTS: {
            "dataset": f"exported dataset: {', '.join(EXPORTED_TABLES)}",
            "format": f"file format: {', '.join(FORMAT_FILES)}",
            "path": "path of the exported file or folder",
            "rows": "records in the file",
            "source_table": "table the records came from (its kept rows, of the first replicate)",
        }
    }
)


class ExportsConfig(dg.Config, ExportSettings):
    """Run config of `instruction_dataset_exports`: the fields of ExportSettings (refine_af_pipeline/exports.py)."""


@dg.asset(group_name=groups.EXPORTS, kinds={"duckdb", "parquet", "json"}, deps=list(EXPORTED_TABLES.values()))
def instruction_dataset_exports(
    context: dg.AssetExecutionContext, config: ExportsConfig, warehouse: Warehouse, artifact_store: ArtifactStore
) -> dg.MaterializeResult:
    """The kept (instruction, input, output) rows of REFINE-AF, TeaMs-RL (and of the Self-Instruct
    baseline) with their provenance columns, each written as Alpaca-format JSON, JSONL, parquet and a Hugging
    Face `datasets` folder (save_to_disk) under the run's artifact folder. Each dataset's folder is
    written aside and renamed into place, so it is complete or absent. This asset's table lists
    every file with its row count."""
    out_root = artifact_store.run_dir(EXPORTS, context.run_id)
    datasets = [d for d in EXPORTED_TABLES if config.include_self_instruct or d != "self_instruct"]
    listing = []
    for dataset in datasets:
        table = EXPORTED_TABLES[dataset]
        pairs = warehouse.read_table(table)
        if pairs is None:
            raise dg.Failure(f"{table} is missing: materialize it before exporting")
        rows = export_rows(pairs, dataset)
        paths = write_dataset_exports(rows, out_root / dataset)
        listing += [
            dict(
                dataset=dataset, format=fmt, path=str(path), rows=rows.height, source_table=table, run_id=context.run_id
            )
            for fmt, path in paths.items()
        ]
        context.log.info(f"exported {rows.height} {dataset} rows to {out_root / dataset}")
    df = pl.DataFrame(listing)
    warehouse.write_table(EXPORTS, df)
    return dg.MaterializeResult(
        metadata={
            **table_metadata(df, ["dataset", "format", "rows"], table=EXPORTS),
            "export_dir": dg.MetadataValue.path(str(out_root)),
            **{f"rows_{d}": int(df.filter(pl.col("dataset") == d)["rows"][0]) for d in datasets},
            "files": metadata_table(df.select("dataset", "format", "rows", "path"), table=EXPORTS),
        }
    )
