"""A code location with one asset that sleeps, for the run-monitoring test (no model, no torch)."""

import time

import dagster as dg


class SleepConfig(dg.Config):
    seconds: float = 600.0


@dg.asset
def sleepy(config: SleepConfig) -> None:
    time.sleep(config.seconds)


defs = dg.Definitions(assets=[sleepy], jobs=[dg.define_asset_job("sleepy_job", selection=[sleepy])])
