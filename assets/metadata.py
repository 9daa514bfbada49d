"""Metadata every asset reports: row count, column schema, a preview, and charts."""

import base64
import math

import dagster as dg
import polars as pl

from .columns import column_description

_DTYPE_NAMES = {pl.Utf8: "string", pl.Boolean: "bool", pl.Float64: "float", pl.Int64: "int"}


def table_metadata(
    df: pl.DataFrame,
    preview_columns: list[str] | None = None,
    preview_rows: int = 5,
    total_rows: int | None = None,
    *,
    table: str,
) -> dict:
    """`table`: the table `df` holds rows of, whose column descriptions the schema shows
    (assets/columns.py); `total_rows`: the table's size when `df` is only the rows this run appended."""
    schema = _described_schema(df, table)
    preview = df.select(preview_columns) if preview_columns else df
    return {
        "dagster/row_count": dg.MetadataValue.int(df.height if total_rows is None else total_rows),
        "dagster/column_schema": dg.MetadataValue.table_schema(schema),
        "preview": dg.MetadataValue.md(markdown_table(preview.head(preview_rows))),
    }


def stored_table_metadata(warehouse, table: str, preview_columns: list[str] | None = None) -> dict:
    """table_metadata of a stored table, for a run that wrote nothing to it (the schema and a
    preview from its first rows, its full row count)."""
    df = warehouse.query(f'SELECT * FROM "{table}" LIMIT 5') if warehouse.table_exists(table) else pl.DataFrame()
    columns = [c for c in (preview_columns or []) if c in df.columns] or None
    return table_metadata(df, columns, total_rows=warehouse.row_count(table), table=table)


def _described_schema(df: pl.DataFrame, table: str) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, _DTYPE_NAMES.get(dtype, str(dtype)), description=column_description(table, name))
            for name, dtype in df.schema.items()
        ]
    )


def metadata_table(df: pl.DataFrame, *, table: str) -> dg.MetadataValue:
    """`df` as a Dagster table (the UI sorts and scrolls it), each column described as in `table`:
    the stored table it shows columns of, or a metadata table's own name (`<asset>/<metadata key>`)."""
    schema = _described_schema(df, table)
    records = [dg.TableRecord({k: _plain(v) for k, v in row.items()}) for row in df.iter_rows(named=True)]
    return dg.MetadataValue.table(records, schema)


def _plain(value):
    # TableRecord takes str, int, float, bool or None; NaN is not JSON, the UI shows None as empty.
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def markdown_table(df: pl.DataFrame, max_chars: int = 120) -> str:
    if df.height == 0:
        return "_(no rows)_"

    def cell(v) -> str:
        text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def progress_logger(context: dg.AssetExecutionContext, what: str, unit_tokens: int | None = None):
    """A callback for batched loops: logs batches done of total, rate and ETA to the run log."""

    def report(done: int, total: int, elapsed: float) -> None:
        eta = elapsed / done * (total - done) if done else 0.0
        rate = f", ~{unit_tokens * done / elapsed:.0f} tokens/s max" if unit_tokens and elapsed > 0 else ""
        context.log.info(f"{what}: batch {done}/{total}, {elapsed:.0f} s elapsed{rate}, ETA {eta:.0f} s")

    return report


def peak_memory(device: str = "cpu") -> dict:
    """Peak resident memory of this step's process so far (and peak GPU memory on CUDA)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    figures = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device.startswith("cuda"):
        import torch

        figures["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return figures
