"""`make cluster-demo`: a Ray cluster of a head and a second node on this machine (two raylets on
loopback, one CPU each), the demo materialized through it, and the cluster stopped again.

    python -m refine_af_pipeline.cluster_demo [--config configs/demo.yaml] [--select '*']

Generation and likelihood reads go to two Ray actors, one per node (backend ray), and RL and SFT
train as two Ray Train workers, one per node (training_launcher ray); Dagster, DuckDB and every
table stay in this process's runs, as without a cluster. Whatever the run does, the cluster is shut
down before this exits (the run's exit status is passed on)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def cluster_environment(address: str) -> dict[str, str]:
    """The environment that points every step at the cluster."""
    return {
        "RAY_ADDRESS": address,
        "REFINE_AF_BACKEND": "ray",
        # The TeaMs-RL steps open the expert beside the base model: a second pool of two actors would
        # not fit on two one-CPU nodes, so the expert stays in the step.
        "REFINE_AF_EXPERT_BACKEND": "transformers",
        "REFINE_AF_RAY_ACTORS": "2",
        "REFINE_AF_RAY_CPUS_PER_ACTOR": "1",
        "REFINE_AF_TRAINING_LAUNCHER": "ray",
        "REFINE_AF_TRAINING_PROCESSES": "2",
        "REFINE_AF_TRAINING_CPUS_PER_WORKER": "1",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="the run config (default: the demo profile)")
    parser.add_argument("--select", default="*", help="the assets: a Dagster asset selection (default: all)")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(f"Ray cluster: head and a second node at {cluster.address} ({time.monotonic() - started:.0f} s)")
        env = {**os.environ, **cluster_environment(cluster.address)}
        command = [
            *(sys.executable, "-m", "dagster", "asset", "materialize"),
            *("-m", "refine_af_pipeline.definitions", "--select", args.select, "-c", args.config),
        ]
        return subprocess.run(command, env=env).returncode
    finally:
        cluster.shutdown()
        print("Ray cluster stopped")


if __name__ == "__main__":
    sys.exit(main())
