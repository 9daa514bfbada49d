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
