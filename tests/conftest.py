import os
import sys
from pathlib import Path

import pytest

# No test may reach the network; the hub client then fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never touch the user's Dagster instance or data: materialize() uses an ephemeral instance,
# the CLI a temporary one, and every test writes under tmp_path.
for _name in ("DAGSTER_HOME", "REFINE_AF_DATA_DIR"):
    os.environ.pop(_name, None)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from refine_af_pipeline.llm.embedded_model import ensure_embedded_model

    return Path(ensure_embedded_model())


@pytest.fixture(scope="session")
def vllm_server(embedded_model_dir, tmp_path_factory):
    """One real vLLM server with the embedded model for the whole session (it takes minutes to start)."""
    from vllm_server import VLLMServer, require_vllm_python

    python = require_vllm_python()
    server = VLLMServer(python, embedded_model_dir, tmp_path_factory.mktemp("vllm") / "server.log")
    print(f"\nvllm server up in {server.start_seconds:.0f} s at {server.url}")
    yield server
    server.stop()


# Test tiers. Every test declares exactly one tier marker (module `pytestmark`, or on the test where
# a file mixes tiers); `make test-fast` runs `-m "unit or graph"`, `make test` every tier. Declared
# rather than derived from fixtures: the marker is what `-m` selects and what a reader sees, and
# fixtures do not tell everything (a test may start the embedded model or a server itself). This
# hook then refuses to collect a test without a tier, with two, or with one that contradicts what
# its fixtures or module use, so a test that starts needing the embedded model cannot slip into
# test-fast unnoticed. A file mixing unit and graph tests is marked graph as a whole (both run in
# test-fast); a file mixing them with slow, engines or live tests marks each test.
TIERS = ("unit", "graph", "slow", "engines", "live")
# The tiers a test may have when it uses the fixture (conftest fixtures, transitively).
FIXTURE_TIERS = {
    "tiny_model_dir": {"graph", "slow", "engines", "live"},
    "embedded_model_dir": {"slow", "engines"},
    "vllm_server": {"engines"},
}


def _allowed_tiers(item) -> tuple[set[str], list[str]]:
    allowed, reasons = set(TIERS), []
    for fixture, tiers in FIXTURE_TIERS.items():
        if fixture in item.fixturenames:
            allowed &= tiers
            reasons.append(f"uses {fixture}")
    module = getattr(item, "module", None)
    if module is not None and any(getattr(v, "__module__", None) == "dagster_services" for v in vars(module).values()):
        allowed &= {"live"}
        reasons.append("its module starts Dagster services (dagster_services)")
    if Path(__file__).parent / "engines" in Path(item.path).parents:
        allowed &= {"engines"}
        reasons.append("it lies in tests/engines")
    return allowed, reasons


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything, so every collected test is checked
def pytest_collection_modifyitems(config, items):
    problems = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {'tiers ' + ', '.join(tiers) if tiers else 'no tier'}")
            continue
        allowed, reasons = _allowed_tiers(item)
        if tiers[0] not in allowed:
            fit = f"mark it {' or '.join(sorted(allowed))}" if allowed else "no tier fits all of them"
            problems.append(f"{item.nodeid}: marked {tiers[0]}, but {' and '.join(reasons)}: {fit}")
    if problems:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker ({', '.join(TIERS)}; pyproject.toml, tests/conftest.py):\n  "
            + "\n  ".join(problems)
        )


@pytest.fixture(scope="session")
def upstream_of_instances(tiny_model_dir, tmp_path_factory):
    """A data directory with everything RL and instance generation read (kept pool, base scores, the
    learned reward, an RL adapter), materialized once for the session on the tiny model; tests copy
    it (pipeline_helpers.copy_data_dir) before they write."""
    from pipeline_helpers import STAGES_BEFORE_RL, materialize, smallest_run_config

    data_dir = tmp_path_factory.mktemp("instances")
    result = materialize(
        data_dir,
        str(tiny_model_dir),
        smallest_run_config(),
        selection=[*STAGES_BEFORE_RL, "rl_refined_policy"],
    )
    assert result.success
    return data_dir
