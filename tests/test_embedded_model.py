"""The real embedded model (SmolLM2-135M-Instruct from PyPI) through the whole graph at the
smallest sizes. Slow (minutes on 2 cores); it runs in CI."""

import duckdb
import pytest
from pipeline_helpers import materialize, smallest_run_config

from refine_af_pipeline.llm.embedded_model import ensure_embedded_model
from refine_af_pipeline.llm.models import ModelUnavailable, resolve_model_source


@pytest.mark.slow
def test_embedded_model_runs_the_whole_graph(tmp_path):
    path = ensure_embedded_model()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = smallest_run_config(
        # 16 prompts: the embedded model copies many prompt examples (ROUGE-L 1.0), 0.56-1.1 instructions
        # were kept per prompt over 7 runs, and 4 prompts once kept only 2 (the prompts differ per run id).
        bootstrap_instructions={"num_prompts": 16, "classification_prompts": 0, "max_new_tokens": 96},
        reward_scores={"max_instructions": 4, "max_new_tokens": 48},
        rl_refined_policy={"max_steps": 1, "prompts_per_step": 2, "group_size": 2, "max_completion_length": 24},
        # 8 instructions, not 4: with 4 a branch's instances were once all filtered out and its SFT
        # step failed with "no kept pairs".
        instance_output_pairs={"max_instructions": 8, "max_new_tokens": 48, "replicates": 1},
        evaluation={"instances_per_task": 1, "max_new_tokens": 8},
        # More seed tasks than the tiny-model default: the embedded rewriter often copies the worked
        # example or the task, and the branch needs at least one kept instruction.
        teams_evolved_instructions={"max_seeds": 24},
    )
    result = materialize(tmp_path, "embedded", config, batch_size=4)
    assert result.success
    with duckdb.connect(str(tmp_path / "refine_af.duckdb"), read_only=True) as conn:
        model_ids = {r[0] for r in conn.execute("SELECT DISTINCT model_id FROM raw_instructions").fetchall()}
        kept = conn.execute("SELECT count(*) FROM deduplicated_instructions WHERE decision = 'kept'").fetchone()[0]
        evaluated = conn.execute("SELECT count(DISTINCT model) FROM evaluation").fetchone()[0]
    assert model_ids == {"HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF Q4_1)"}
    assert kept > 0
    assert evaluated == 5  # base, Self-Instruct-, REFINE-AF-, best-of-N- and TeaMs-RL-tuned


@pytest.mark.unit
def test_missing_hub_model_fails_fast_with_its_name():
    source = resolve_model_source("no-such-org/no-such-model-xyz")
    from refine_af_pipeline.llm.models import load_tokenizer

    with pytest.raises(ModelUnavailable, match="no-such-org/no-such-model-xyz"):
        load_tokenizer(source)


@pytest.mark.unit
def test_missing_local_dir_and_absent_cuda_are_clear(tmp_path):
    from refine_af_pipeline.llm.models import resolve_device

    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelUnavailable, match="no CUDA device"):
            resolve_device("cuda:0")
