"""Reads shared by several stages, so each stage module stays a thin wrapper."""

import json

import dagster as dg
import polars as pl

from refine_af_pipeline.feedback.scores import COMPONENTS, ComponentStats
from refine_af_pipeline.llm.backend import Provenance, SamplingParams
from refine_af_pipeline.training.splits import Split, in_share, stable_split
from resources import Warehouse

from .instructions import DEDUP, POOL, current_pool, rows_of_pool, tag_run_with_pool
from .reward_model import REWARD_MODEL

# What a stage that reads the kept instructions declares: instruction_pool names the pool.
POOL_DEPS = [POOL, DEDUP]


def kept_instructions(warehouse: Warehouse, context: dg.AssetExecutionContext | None = None) -> pl.DataFrame:
    """The kept instructions of the pool the latest bootstrap run grew (no other pool's); with a
    context, logged and tagged on the run (refine_af/pool), so the UI's runs filter by pool."""
    pool = current_pool(warehouse)
    df = rows_of_pool(warehouse, DEDUP, pool)
    if df is None or df.filter(pl.col("decision") == "kept").height == 0:
        raise dg.Failure(
            f"instruction pool {pool!r} has no kept instructions in deduplicated_instructions: materialize "
            "bootstrap_instructions (raw_instructions and deduplicated_instructions) for it first (or generate "
            "more prompts)"
        )
    kept = df.filter(pl.col("decision") == "kept").select("instruction_id", "instruction", "is_classification")
    if context is not None:
        context.log.info(f"reading instruction pool {pool!r}: {kept.height} kept instructions")
        tag_run_with_pool(context, pool)
    return kept


# RL never holds out more than half the pool: a small pool keeps instructions to train on.
RL_MAX_HELDOUT_FRACTION = 0.5


def rl_heldout_split(instruction_ids: list[str], share: float, min_heldout: int) -> Split:
    """RL's held-out instructions by the pipeline's one split (training/splits.py, unsalted): `share`
    of the id hash, at least min(min_heldout, half the pool), at most half. The policy records the
    split's share: re-deriving with it on a grown pool adds only new instructions, never one the
    policy trained on."""
    return stable_split(instruction_ids, share, minimum=min_heldout, max_fraction=RL_MAX_HELDOUT_FRACTION)


def split_held_out(kept: pl.DataFrame, share: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(instructions RL trains on, held-out instructions) by the stable id hash."""
    held = kept["instruction_id"].map_elements(lambda i: in_share(i, share), return_dtype=pl.Boolean)
    return kept.filter(~held), kept.filter(held)


STANDARDISATION = "reward_standardisation"


def standardisation_frame(
    stats: ComponentStats,
    weights: dict[str, float],
    bias: float,
    weights_source: str,
    instances: int,
    model_id: str,
    run_id: str,
    pool: str,
) -> pl.DataFrame:
    """The reward_standardisation table: one row; a mean, spread and weight column per component."""
    return pl.DataFrame(
        [
            {
                **{f"mean_{c}": float(stats.mean[c]) for c in COMPONENTS},
                **{f"std_{c}": float(stats.std[c]) for c in COMPONENTS},
                **{f"weight_{c}": float(weights.get(c, 0.0)) for c in COMPONENTS},
                "bias": float(bias),
                "weights_source": weights_source,
                "standardised_instances": instances,
                "model_id": model_id,
                "pool": pool,
                "run_id": run_id,
            }
        ]
    )


def require_pool(warehouse: Warehouse, table: str, pool: str) -> None:
    """Fails unless the latest run of `table` (a stage made from the kept instructions) was made
    from `pool`: a stage never combines what two pools made."""
    columns = warehouse.table_columns(table)
    made_for = warehouse.latest_run_rows(table, ["pool"])["pool"][0] if "pool" in columns else None
    if columns and made_for != pool:
        raise dg.Failure(
            f"{table} was made from instruction pool {made_for!r} and this run reads pool {pool!r} (the latest "
            f"{POOL}): materialize {table} again for this pool"
        )


def base_component_stats(warehouse: Warehouse) -> ComponentStats:
    """The standardisation of every later reward, from the reward_standardisation asset."""
    df = warehouse.read_table(STANDARDISATION)
    if df is None or df.height != 1:
        raise dg.Failure(
            f"{STANDARDISATION} is missing: materialize reward_scores first (its base-model scores "
            "standardise the reward)"
        )
    row = df.row(0, named=True)
    stats = ComponentStats(mean={c: row[f"mean_{c}"] for c in COMPONENTS}, std={c: row[f"std_{c}"] for c in COMPONENTS})
    # Weights fitted to human ratings belong to this standardisation: every later reward uses them.
    # Configured weights stay the feedback_scorer's, so a changed config applies downstream.
    if row["weights_source"].startswith("calibration"):
        stats.weights = {c: row[f"weight_{c}"] for c in COMPONENTS}
        stats.bias = float(row["bias"])
    return stats


# The columns of a scored instance's row that are its own (reward_scores and the instance stages;
# the keys, components and provenance are assets/columns.py's shared ones).
SCORED_INSTANCE_COLUMNS = {
    "parse_status": "ok, or why the generation did not parse as an instance: missing_output, empty_output",
    "reward": "combined reward of the instance: bias + sum of weight x standardised component "
    "(reward_standardisation); the gate_reward, -3 by default, when the instance gate rejected it",
}


def scored_instance_frame(
    keys: list[dict],
    rows: list[dict],
    served: Provenance,
    versions: dict[str, str],
    params: SamplingParams,
    run_id: str,
    **extra: str | None,
) -> pl.DataFrame:
    """One row per scored instance (reward_scores and both instance stages): its keys, what was
    generated and how it scored, then the provenance: `extra` (e.g. the policy adapter), the model
    as served (name, backend, engine version), each component's scorer, sampling, run."""
    return pl.DataFrame(
        [
            dict(
                **key,
                **row,
                **extra,
                **provenance_columns(served),
                scorers=json.dumps(versions),
                **{f"{c}_scorer": versions[c] for c in COMPONENTS},
                sampling_params=json.dumps(params.as_dict()),
                run_id=run_id,
            )
            for key, row in zip(keys, rows)
        ],
        schema_overrides={c: pl.Float64 for c in COMPONENTS} | {"gate_reason": pl.Utf8} | {k: pl.Utf8 for k in extra},
    )


def provenance_columns(served: Provenance) -> dict[str, str]:
    """model_id (the name the model was served as), backend, engine_version."""
    return {"model_id": served.served_model, "backend": served.backend, "engine_version": served.engine_version}


def learned_reward_dir(warehouse: Warehouse, feedback_scorer=None) -> str | None:
    """The folder of the reward model the reward_model asset fitted last, which the default
    learned_reward scorer loads; None when the feedback_scorer names its own folder."""
    if feedback_scorer is not None and feedback_scorer.learned_reward.strip() != "bradley-terry":
        return None
    df = warehouse.latest_run_rows(REWARD_MODEL)
    if df is None or df.height == 0:
        raise dg.Failure(
            "reward_model is missing: materialize reward_model first (it fits the learned_reward "
            "component of every reward)"
        )
    run_id = df["run_id"][0]
    # In this data folder (a copy reads its own): Warehouse.artifact_path.
    folder = warehouse.artifact_path(df["model_dir"][0], REWARD_MODEL, run_id)
    if not folder.is_dir():
        raise dg.Failure(
            f"the reward model folder {folder} (reward_model, run {run_id}) is gone; materialize reward_model again"
        )
    return str(folder)


def latest_rows(warehouse: Warehouse, asset: str, columns: tuple[str, ...] = ()) -> tuple[str, pl.DataFrame]:
    """The run that wrote `asset`'s table last and the rows it wrote: how a declared upstream hands
    its artifacts (an adapter's path, the share it held out) to the assets that depend on it. The
    data folder is the whole state; the Dagster instance only keeps the history. `columns`: those
    the caller needs, which the rows must record."""
    df = warehouse.latest_run_rows(asset)
    if df is None or df.height == 0:
        raise dg.Failure(
            f"{asset} has {'no table' if df is None else 'an empty table'} in {warehouse.database}: its "
            f"artifacts are handed over through its table, so materialize {asset} into this data folder first"
        )
    run_id = df["run_id"][0]
    missing = [c for c in columns if c not in df.columns or df[c].null_count() == df.height]
    if missing:
        raise dg.Failure(
            f"the rows of {asset}'s latest run ({run_id}) record no {', '.join(missing)}: materialize {asset} "
            "again with this version of the pipeline"
        )
    return run_id, df


def artifact_folders(warehouse: Warehouse, asset: str, run_id: str, stored: list[str], what: str) -> list[str]:
    """The artifacts the rows of `asset`'s run `run_id` record (`stored`), found in this data folder
    (Warehouse.artifact_path: a copied data folder reads its own copy); fails naming the asset, the
    run and each missing path."""
    found = [warehouse.artifact_path(p, asset, run_id) for p in stored]
    missing = [
        f"{path}" + (f" (recorded as {p})" if str(path) != p else "")
        for p, path in zip(stored, found)
        if not path.exists()
    ]
    if missing:
        raise dg.Failure(
            f"the {what} of {asset}'s latest run ({run_id}) {'is' if len(stored) == 1 else 'are'} gone: "
            f"{', '.join(missing)} does not exist; materialize {asset} again"
        )
    return [str(path) for path in found]


def adapter_folder(warehouse: Warehouse, asset: str, rows: tuple[str, pl.DataFrame] | None = None) -> str:
    """The LoRA adapter folder of `asset`'s latest run (`rows`: latest_rows(warehouse, asset), when the
    caller has them already)."""
    run_id, df = rows or latest_rows(warehouse, asset, ("adapter_path",))
    if "adapter_path" not in df.columns or df["adapter_path"].null_count() == df.height:
        raise dg.Failure(f"the latest run of {asset} ({run_id}) records no adapter_path")
    return artifact_folders(warehouse, asset, run_id, [df["adapter_path"].drop_nulls()[-1]], "adapter")[0]


def adapter_folders(warehouse: Warehouse, asset: str) -> dict[int, str]:
    """Replicate -> adapter folder of `asset`'s latest run (a fine-tuned model trains one adapter per
    replicate; every row of its epoch log names its replicate's adapter)."""
    run_id, df = latest_rows(warehouse, asset, ("adapter_path",))
    replicate = pl.col("replicate").fill_null(0) if "replicate" in df.columns else pl.lit(0)
    pairs = (
        df.filter(pl.col("adapter_path").is_not_null())
        .select(replicate.cast(pl.Int64).alias("replicate"), "adapter_path")
        .unique(subset="replicate", keep="last", maintain_order=True)
        .sort("replicate")
    )
    paths = artifact_folders(warehouse, asset, run_id, pairs["adapter_path"].to_list(), "adapters")
    return dict(zip(pairs["replicate"].to_list(), paths))
