"""Where model weights and adapters live: run-scoped folders under one root, never pickled."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from refine_af_pipeline.training.checkpoints import Checkpoints


class ArtifactStore(dg.ConfigurableResource):
    root: str

    def run_dir(self, asset_name: str, run_id: str) -> Path:
        path = Path(self.root) / asset_name / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpoints(self, asset_name: str, fingerprint: str, every_steps: int) -> Checkpoints:
        """Where `asset_name`'s training made of `fingerprint` saves its checkpoints: not under a
        run id, so the re-run of a killed step finds them."""
        return Checkpoints(Path(self.root) / asset_name / "checkpoints" / fingerprint, every_steps)
