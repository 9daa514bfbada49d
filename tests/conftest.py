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
