"""The checkpoint folder of a training step: named by what the training is made of, so a re-run of
a killed step (a new run, even a new run id) finds the checkpoints and goes on from them."""

import dagster as dg

from refine_af_pipeline.training.checkpoints import Checkpoints, step_of, training_fingerprint
from resources import ArtifactStore


def training_checkpoints(
    context: dg.AssetExecutionContext, artifact_store: ArtifactStore, asset: str, every_steps: int, **made_of
) -> Checkpoints:
    """The checkpoints of `asset`'s training made of `made_of` (settings without the checkpoint
    interval, the data, the base model, the reward's standardisation); logs a resume."""
    checkpoints = artifact_store.checkpoints(asset, training_fingerprint(**made_of), every_steps)
    latest = checkpoints.latest()
    if latest is not None:
        context.log.info(
            f"{asset}: resuming from the checkpoint of step {step_of(latest)} ({latest}), left by a run that was "
            "stopped with the same settings and data"
        )
    return checkpoints


def resume_metadata(resumed_from: int, taken: int, unit: str = "step") -> dict:
    """Whether this run went on from a checkpoint (0: trained from the start) and how many optimizer
    steps (TRPO updates for the instructor) it took itself."""
    return {f"resumed_from_{unit}": resumed_from, f"{unit}s_taken_this_run": taken}
