"""Run sizes as named profiles, read from one place: configs/<profile>.yaml.

`make run` passes configs/demo.yaml, `make experiment` configs/experiment.yaml; the UI offers one job
per profile with that file as its launchpad config, and the nightly schedule runs the profile its
setting names. "method" is the config defaults: REFINE-AF's full scale (a 15,000-instruction pool,
1,500 GRPO steps), days of work on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .instructions.pools import PoolNameError, check_pool_name

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
METHOD = "method"
PROFILES = ("demo", "experiment", METHOD)
SCHEDULE_PROFILE_VAR = "REFINE_AF_SCHEDULE_PROFILE"
SCHEDULE_POOL_VAR = "REFINE_AF_SCHEDULE_POOL"


class ProfileError(ValueError):
    pass


def profile_path(name: str) -> Path | None:
    """The profile's run-config file (None for the method's defaults)."""
    if name not in PROFILES:
        raise ProfileError(f"unknown run profile {name!r}: choose one of {', '.join(PROFILES)}")
    return None if name == METHOD else CONFIG_DIR / f"{name}.yaml"


def profile_run_config(name: str) -> dict:
    """The run config of a profile: its YAML file, or {} (every default) for the method's scale."""
    path = profile_path(name)
    if path is None:
        return {}
    if not path.is_file():
        raise ProfileError(f"run profile {name!r}: {path} is missing (it ships with the repository's configs/)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"run profile {name!r}: {path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ProfileError(f"run profile {name!r}: {path} must hold a run config mapping (ops: ...)")
    return config


def schedule_profile(cuda_available: bool) -> str:
    """The profile the nightly regeneration runs: REFINE_AF_SCHEDULE_PROFILE when set; otherwise the
    demo's on a CPU (the method's scale would hold the one-run queue for days) and the method's where
    a GPU is present."""
    name = os.environ.get(SCHEDULE_PROFILE_VAR, "").strip()
    if name:
        profile_path(name)  # an unknown name fails here, naming the variable's choices
        return name
    return METHOD if cuda_available else "demo"


def schedule_pool() -> str:
    """The instruction pool the nightly regeneration grows: REFINE_AF_SCHEDULE_POOL when set (checked
    like the config field), else empty, i.e. the pool the seed set and the generator model name."""
    name = os.environ.get(SCHEDULE_POOL_VAR, "").strip()
    if name:
        try:
            check_pool_name(name)
        except PoolNameError as exc:
            raise ProfileError(f"{SCHEDULE_POOL_VAR}: {exc}") from None
    return name


def with_bootstrap_seed(config: dict, seed: int, pool: str = "") -> dict:
    """A copy of `config` with the bootstrap's seed set, and its pool where `pool` is given (other
    bootstrap settings kept)."""
    ops = dict(config.get("ops") or {})
    bootstrap = dict(ops.get("bootstrap_instructions") or {})
    bootstrap["config"] = {**(bootstrap.get("config") or {}), "seed": seed, **({"pool": pool} if pool else {})}
    ops["bootstrap_instructions"] = bootstrap
    return {**config, "ops": ops}
