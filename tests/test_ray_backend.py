"""The ray backend on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster, one CPU per
node, so two one-CPU actors land on different nodes): the rows it returns are the in-process
transformers backend's, however they were split; a node lost mid-call costs no row and repeats
none; a cluster that cannot hold the actors, or cannot be reached, fails the step at once, naming
what was asked."""

import importlib.metadata
import json
import threading
import time
from types import SimpleNamespace

import duckdb
import pytest
from pipeline_helpers import materialize, smallest_run_config

from refine_af_pipeline.instructions.bootstrap import BootstrapPrompt, generate_instruction_rows
from refine_af_pipeline.llm.backend import SamplingParams, render_prompt
from refine_af_pipeline.llm.models import ModelUnavailable
from refine_af_pipeline.llm.ray_backend import (
    RAY_VERSION,
    RayClusterError,
    RaySettings,
    ReplicasLost,
    ReplicaSpec,
    check_capacity,
    check_reachable,
    contiguous_slices,
    open_ray_models,
)
from resources import LanguageModelResource
from resources.language_model import choose_backend


def on_cluster(test):
    """A test that starts a Ray cluster and the tiny model: tier slow (seconds each, a minute or two
    for the file), and `-m cluster` picks them."""
    return pytest.mark.cluster(pytest.mark.slow(test))


BOOTSTRAP = ["seed_pool", "raw_instructions", "deduplicated_instructions", "instruction_pool"]
WORDS = "explain river garden market engine planet recipe letter budget window teacher forest".split()


def _start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    return cluster, worker


def _stop(cluster) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    cluster, _ = _start_cluster()
    yield cluster
    _stop(cluster)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with random (non-zero) weights, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    target = tmp_path_factory.mktemp("tiny-adapter")
    model.save_pretrained(target)
    return str(target)


def _in_process(model_dir, adapters):
    return LanguageModelResource(model=str(model_dir), device="cpu").open_models(adapters)


def _on_ray(model_dir, address, adapters, **settings):
    return open_ray_models(
        ReplicaSpec(str(model_dir), device="cpu"),
        RaySettings(address=address, **settings),
        _in_process_tokenizer(model_dir),
        adapters,
    )


def _in_process_tokenizer(model_dir):
    from refine_af_pipeline.llm.models import load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source(str(model_dir)))


def _prompts(tokenizer, n: int) -> list[str]:
    return [render_prompt(tokenizer, " ".join(WORDS[(k + j) % len(WORDS)] for j in range(3 + k % 5))) for k in range(n)]


@pytest.mark.unit
def test_rows_are_split_into_contiguous_even_slices():
    assert contiguous_slices(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert contiguous_slices(2, 4) == [(0, 1), (1, 2)]  # no empty slice
    assert contiguous_slices(5, 1) == [(0, 5)]


@pytest.mark.unit
def test_ray_is_chosen_by_name_only_and_says_where_its_actors_run(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    resource = LanguageModelResource(backend="ray", ray_actors=4, ray_cpus_per_actor=8, ray_gpus_per_actor=1)
    assert str(resource.backend_choice()) == (
        "ray -> ray: requested (4 actors x (8 CPU, 1 GPU) on a local Ray, transformers in each)"
    )
    with pytest.raises(ModelUnavailable, match=r"ray is not installed here \(pip install ray==2\.60\.0\)"):
        choose_backend("ray", [], _never, _never, ray_installed=lambda: False)
    assert importlib.metadata.version("ray") == RAY_VERSION  # the pin the install hint names is the one installed


@pytest.mark.unit
def test_a_cluster_that_cannot_hold_the_actors_is_refused_naming_ask_and_nodes():
    one_cpu_nodes = [{"Alive": True, "NodeManagerAddress": f"10.0.0.{k}", "Resources": {"CPU": 1.0}} for k in (1, 2)]
    ray = SimpleNamespace(nodes=lambda: one_cpu_nodes)
    with pytest.raises(RayClusterError) as gpus:
        check_capacity(ray, RaySettings(actors=2, cpus_per_actor=1, gpus_per_actor=1))
    assert "2 actor(s) of 1 CPU and 1 GPU each (2 CPUs, 2 GPUs in all)" in str(gpus.value)
    assert "2 node(s) with 2 CPUs and 0 GPUs in all (10.0.0.1: 1 CPU, 0 GPU; 10.0.0.2: 1 CPU, 0 GPU)" in str(gpus.value)
    # Two CPUs in all, but no node has two for one actor.
    with pytest.raises(RayClusterError, match=r"1 actor\(s\) of 2 CPU each .* room for 0 such actor"):
        check_capacity(ray, RaySettings(actors=1, cpus_per_actor=2))
    check_capacity(ray, RaySettings(actors=2, cpus_per_actor=1))


@pytest.mark.unit
def test_an_unreachable_or_malformed_address_fails_at_once_naming_it():
    started = time.monotonic()
    with pytest.raises(RayClusterError, match="cannot reach the Ray cluster at 'ray://127.0.0.1:9'"):
        check_reachable("ray://127.0.0.1:9")
    with pytest.raises(RayClusterError, match="'head-node' is not host:port"):
        check_reachable("head-node")
    assert time.monotonic() - started < 30


def _never():
    raise AssertionError("asked although the answer does not depend on it")


@on_cluster
def test_two_actors_on_two_nodes_return_the_in_process_rows(cluster, tiny_model_dir, adapter_dir):
    adapters = {"base": None, "tuned": adapter_dir}
    local = _in_process(tiny_model_dir, adapters)
    served, pool = _on_ray(tiny_model_dir, cluster.address, adapters)
    try:
        assert len({r.node.node_id for r in pool.replicas}) == 2  # one actor on each node
        prompts = _prompts(served["base"].tokenizer, 10)
        greedy = SamplingParams(max_new_tokens=24, do_sample=False)
        sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95)
        assert served["base"].generate(prompts, greedy, batch_size=4) == local["base"].generate(prompts, greedy, 4)
        assert set(pool.rows_done.values()) == {5}  # each actor did its half
        # Sampled: each row draws from its own seed, so the split does not change a row's text.
        ray_sampled = served["base"].generate(prompts, sampled, batch_size=4, seed=11)
        assert ray_sampled == local["base"].generate(prompts, sampled, 4, seed=11)
        assert ray_sampled != served["base"].generate(prompts, sampled, batch_size=4, seed=12)
        # An adapter: switched on the actor's shared base weights, and merged for generation as in process.
        with served["tuned"].for_generation() as tuned, local["tuned"].for_generation() as local_tuned:
            tuned_rows = tuned.generate(prompts, greedy, batch_size=4)
            assert tuned_rows == local_tuned.generate(prompts, greedy, 4)
        assert tuned_rows != served["base"].generate(prompts, greedy, batch_size=4)
        assert served["tuned"].provenance.backend == "ray"
        assert served["tuned"].provenance.engine_version.startswith("ray 2.60.0 + transformers ")
    finally:
        pool.close()


@on_cluster
def test_likelihood_reads_match_in_process_within_1e5(cluster, tiny_model_dir):
    local = _in_process(tiny_model_dir, {"base": None})["base"]
    served, pool = _on_ray(tiny_model_dir, cluster.address, {"base": None})
    try:
        contexts = _prompts(local.tokenizer, 9)
        continuations = [" ".join(WORDS[k : k + 2 + k % 3]) for k in range(9)]
        ray_lp = served["base"].continuation_logprobs(contexts, continuations, batch_size=4)
        local_lp = local.continuation_logprobs(contexts, continuations, batch_size=4)
        assert [len(v) for v in ray_lp] == [len(v) for v in local_lp]
        assert all(abs(a - b) < 1e-5 for r, q in zip(ray_lp, local_lp) for a, b in zip(r, q))
        ray_p = served["base"].next_token_distribution(contexts, ["Yes", "No"], batch_size=4)
        local_p = local.next_token_distribution(contexts, ["Yes", "No"], batch_size=4)
        assert all(abs(a - b) < 1e-5 for r, q in zip(ray_p, local_p) for a, b in zip(r, q))
    finally:
        pool.close()


@on_cluster
def test_a_node_lost_mid_call_costs_no_row_and_repeats_none(tiny_model_dir):
    """The built behaviour: the lost actor's slice runs again on the survivor; the call returns every
    row once, equal to in process. With no actor left, the call fails naming the lost nodes."""
    import ray

    cluster, worker = _start_cluster()
    try:
        local = _in_process(tiny_model_dir, {"base": None})["base"]
        served, pool = _on_ray(tiny_model_dir, cluster.address, {"base": None})
        prompts = _prompts(local.tokenizer, 12)
        params = SamplingParams(max_new_tokens=48, temperature=0.9, top_p=0.95)
        # The worker's actor is kept busy (minutes of generation), so the call's slice for it waits in its
        # queue: the call is surely in flight when the node goes, whatever the speed of this machine.
        [on_worker] = [r for r in pool.replicas if r.node.node_id == worker.node_id]
        many = prompts * 200
        busy = on_worker.actor.generate.remote(None, False, many, list(range(len(many))), params, 2, 0, False)
        result = {}
        call = threading.Thread(
            target=lambda: result.update(rows=served["base"].generate(prompts, params, batch_size=2, seed=5))
        )
        call.start()
        time.sleep(1.0)
        assert call.is_alive()
        cluster.remove_node(worker)
        call.join(timeout=120)
        assert [str(n) for n in pool.lost] == [f"node {worker.node_id[:12]} ({worker.node_ip_address})"]
        assert result["rows"] == local.generate(prompts, params, 2, seed=5)
        assert sum(pool.rows_done.values()) == len(prompts)  # every row once: the lost slice counted only on rerun
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(busy)
        # The survivor serves the next call alone; once it is lost too, no row comes back.
        assert len(served["base"].generate(prompts[:3], params, batch_size=2, seed=6)) == 3
        ray.kill(pool.live()[0].actor)
        with pytest.raises(ReplicasLost, match=f"node {worker.node_id[:12]}"):
            served["base"].generate(prompts[:3], params, batch_size=2, seed=6)
        pool.close()
    finally:
        _stop(cluster)


@on_cluster
def test_bootstrap_on_ray_writes_the_rows_of_its_plan_in_process(cluster, tiny_model_dir, tmp_path):
    """The bootstrap stage with backend ray writes, for its plan, the rows the in-process backend
    generates from the same plan (a plan's prompts are drawn per run, so two runs are not compared)."""
    result = materialize(
        tmp_path,
        str(tiny_model_dir),
        smallest_run_config(),
        selection=BOOTSTRAP,
        model_settings={"backend": "ray", "ray_address": cluster.address, "ray_actors": 2},
    )
    assert result.success
    columns = ["instruction_id", "instruction", "raw_response", "response_tokens", "hit_token_limit", "parse_status"]
    with duckdb.connect(str(tmp_path / "refine_af.duckdb"), read_only=True) as conn:
        written = conn.execute(f"SELECT {', '.join(columns)}, backend, engine_version FROM raw_instructions").fetchall()
        [(plan_id, settings)] = conn.execute(
            "SELECT plan_id, settings FROM generation_plans WHERE asset = 'raw_instructions'"
        ).fetchall()
        batches = conn.execute(
            "SELECT batch_index, inputs FROM generation_plan_batches WHERE plan_id = ? ORDER BY batch_index",
            [plan_id],
        ).fetchall()
    settings = json.loads(settings)
    params = SamplingParams(
        settings["max_new_tokens"], settings["temperature"], settings["top_p"], settings["do_sample"]
    )
    local = _in_process(tiny_model_dir, {"base": None})["base"]
    step = settings["batch_size"]
    expected = []
    for index, inputs in batches:
        prompts = [BootstrapPrompt(**p) for p in json.loads(inputs)]
        rows = generate_instruction_rows(
            local, prompts, params, plan_id, step, settings["seed"] + index, id_offset=index * step
        )
        expected += [tuple(row[c] for c in columns) for row in rows]
    assert len(written) >= 8 and sorted(w[:-2] for w in written) == sorted(expected)
    assert {w[-2] for w in written} == {"ray"} and all(w[-1].startswith("ray 2.60.0 + transformers") for w in written)


@on_cluster
def test_an_unreachable_address_fails_the_open_naming_it(tiny_model_dir):
    started = time.monotonic()
    resource = LanguageModelResource(model=str(tiny_model_dir), device="cpu", backend="ray", ray_address="127.0.0.1:9")
    with pytest.raises(RayClusterError, match="cannot reach the Ray cluster at '127.0.0.1:9'"):
        resource.open_models({"base": None})
    assert time.monotonic() - started < 30


@on_cluster
def test_a_gpu_ask_on_a_cpu_cluster_fails_the_step_naming_it_and_writes_nothing(cluster, tiny_model_dir, tmp_path):
    started = time.monotonic()
    result = materialize(
        tmp_path,
        str(tiny_model_dir),
        smallest_run_config(),
        selection=BOOTSTRAP,
        raise_on_error=False,
        model_settings={"backend": "ray", "ray_address": cluster.address, "ray_gpus_per_actor": 1.0},
    )
    assert not result.success and time.monotonic() - started < 30
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.to_string()  # the RayClusterError is the error's cause
    assert "2 actor(s) of 1 CPU and 1 GPU each" in message and "0 GPUs in all" in message
    with duckdb.connect(str(tmp_path / "refine_af.duckdb"), read_only=True) as conn:
        tables = {t for (t,) in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert "raw_instructions" not in tables or conn.execute("SELECT count(*) FROM raw_instructions").fetchone() == (
            0,
        )


@on_cluster
def test_actors_that_find_no_free_room_do_not_hang_the_step(cluster, tiny_model_dir):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address=cluster.address)
    try:
        # Room for two one-CPU actors exists, but a reservation holds one CPU: the second actor would wait forever.
        held = placement_group([{"CPU": 1}])
        ray.get(held.ready(), timeout=30)
        started = time.monotonic()
        with pytest.raises(RayClusterError, match=r"only 1 of 2 Ray actor\(s\) started within 3 s.*free now: 0 CPUs"):
            _on_ray(tiny_model_dir, cluster.address, {"base": None}, placement_timeout_s=3)
        assert time.monotonic() - started < 30
        remove_placement_group(held)
    finally:
        ray.shutdown()
