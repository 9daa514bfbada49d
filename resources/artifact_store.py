"""Where model weights and adapters live: run-scoped folders under one root, never pickled."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


class ArtifactStore(dg.ConfigurableResource):
    root: str

    def run_dir(self, asset_name: str, run_id: str) -> Path:
        path = Path(self.root) / asset_name / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path
