"""The ray backend: generation and likelihood reads on Ray actors, each holding one model replica.

The step process (the head: Dagster, DuckDB, the batch ledger) keeps everything but the model
work. A `ReplicaPool` starts `actors` actors for the step, each loading the weights once through
an existing backend (transformers on CPU; vllm with one GPU per actor) and the LoRA adapters the
step asks for. A `RayServedModel` splits every call's rows into contiguous slices, one per live
actor, and gathers the results in row order. Generation sends each row its own seed,
row_seed(seed, k) for its index k in the call, so a row's text is the same however the rows were
split, and the same as the in-process transformers backend gives.

A slice whose actor dies (its node lost) runs again on a surviving actor; only when none survives
does the call fail, naming the lost nodes. Each slice fills its rows once, so no row is returned
twice; the stage commits whole batches, so a failed step resumes its plan on the next run.
docs/engines.md, "Ray: generation on a cluster", says why it is built this way.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .backend import ALL_CAPABILITIES, Generation, ProgressFn, Provenance, SamplingParams, ServedModel, row_seed
from .models import ModelUnavailable

log = logging.getLogger(__name__)

# The pin in pyproject.toml: head and workers must run the same Ray.
RAY_VERSION = "2.60.0"
RAY_INSTALL = f"pip install ray=={RAY_VERSION}"
# A reachable cluster answers a TCP connect at once; ray.init itself would retry for minutes.
CONNECT_TIMEOUT_S = 10.0
# How long actors may wait for a node with room for them (an autoscaler adding one takes minutes).
PLACEMENT_TIMEOUT_S = 120.0
INNER_BACKENDS = ("transformers", "vllm")


class RayClusterError(ModelUnavailable):
    """The cluster cannot hold the actors asked for, or cannot be reached; raised before any row is sent."""


class ReplicasLost(RuntimeError):
    """Every actor of the step died during a call (their nodes lost): the call's rows are not returned."""


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def import_ray():
    try:
        import ray
    except ImportError:
        raise ModelUnavailable(f"backend 'ray' needs Ray on this machine and every node: {RAY_INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Where the actors run and how many: the resource's ray_* fields."""

    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the step
    inner_backend: str = "transformers"
    actors: int = 2
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S

    def summary(self) -> str:
        gpus = f", {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        where = self.address or os.environ.get("RAY_ADDRESS") or "a local Ray"
        return f"{self.actors} actors x ({self.cpus_per_actor} CPU{gpus}) on {where}, {self.inner_backend} in each"


@dataclass(frozen=True)
class ReplicaSpec:
    """What each actor loads: the language model resource's model fields, resolved on the actor's node."""

    model: str
    cache_dir: str | None = None
    allow_download: bool = False
    trust_remote_code: bool = False
    device: str = "auto"  # resolved in the actor: Ray hides the GPUs it did not give the actor
    dtype: str = "auto"
    max_batch_tokens: int = 32768
    vllm_gpu_memory_utilization: float = 0.9  # the actor's GPU is its own
    vllm_max_model_len: int | None = None


# ---------------------------------------------------------------------------------------------
# The actor (plain class; ray.remote wraps it when a pool starts, so importing this module needs no Ray)


class ModelReplica:
    """One copy of the model in a Ray actor, with the LoRA adapters it was asked for, keyed by path."""

    def __init__(self, spec: ReplicaSpec, inner_backend: str, threads: int):
        import torch

        # Ray reserved `threads` CPUs for this actor; torch would otherwise take every core of the node.
        torch.set_num_threads(threads)
        self.spec, self.inner_backend = spec, inner_backend
        self.tokenizer = self.base = self.peft = self.engine = None
        self.adapter_names: dict[str, str] = {}

    def node(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def load(self, adapter_paths: Sequence[str]) -> None:
        from .models import resolve_model_source

        spec = self.spec
        source = resolve_model_source(spec.model, Path(spec.cache_dir) if spec.cache_dir else None, spec.allow_download)
        self.model_id = source.model_id
        if self.inner_backend == "vllm":
            from .vllm_backend import VLLMEngine

            self.engine = VLLMEngine(
                source.path,
                source.model_id,
                dtype=spec.dtype,
                adapters=list(adapter_paths),
                gpu_memory_utilization=spec.vllm_gpu_memory_utilization,
                max_model_len=spec.vllm_max_model_len,
            )
            self.adapter_names = {path: path for path in adapter_paths}
            return
        from .models import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype

        device = resolve_device(spec.device)
        self.tokenizer = load_tokenizer(source, spec.trust_remote_code)
        self.base = load_causal_lm(source, device, resolve_dtype(spec.dtype, device), spec.trust_remote_code)
        self.add_adapters(adapter_paths)

    def add_adapters(self, adapter_paths: Sequence[str]) -> None:
        new = [p for p in adapter_paths if p not in self.adapter_names]
        if not new:
            return
        if self.inner_backend == "vllm":
            raise ModelUnavailable(
                "ray backend with vllm inside: every adapter of a step must be opened at once (vLLM's engine "
                f"is started for its adapters); {new} came later"
            )
        from .adapters import attach_adapters

        for path in new:
            name = f"adapter{len(self.adapter_names)}"
            if self.peft is None:
                self.peft = attach_adapters(self.base, {name: path})
            else:
                self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self.adapter_names[path] = name
        self.peft.eval()

    def provenance(self, adapter_path: str | None) -> Provenance:
        return self._served(adapter_path).provenance

    def generate(
        self,
        adapter_path: str | None,
        merged: bool,
        prompts: Sequence[str],
        row_seeds: Sequence[int],
        params: SamplingParams,
        batch_size: int,
        seed: int,
        stop_after_first_line: bool,
    ) -> list[Generation]:
        if self.inner_backend == "vllm":
            return vllm_generate(self._served(adapter_path), prompts, row_seeds, params, batch_size)
        from . import generation as hf
        from .adapters import merged as merged_view

        model = self._transformers_model(adapter_path)
        with merged_view(model) if merged else nullcontext(model) as view:
            return hf.generate(
                view,
                self.tokenizer,
                prompts,
                params,
                batch_size,
                seed,
                stop_after_first_line=stop_after_first_line,
                max_batch_tokens=self.spec.max_batch_tokens,
                row_seeds=row_seeds,
            )

    def continuation_logprobs(self, adapter_path, contexts, continuations, batch_size) -> list[list[float]]:
        return self._served(adapter_path).continuation_logprobs(contexts, continuations, batch_size)

    def next_token_distribution(self, adapter_path, contexts, candidate_tokens, batch_size) -> list[list[float]]:
        return self._served(adapter_path).next_token_distribution(contexts, candidate_tokens, batch_size)

    def _transformers_model(self, adapter_path: str | None):
        # Once adapters are attached, PEFT has wrapped the base model's layers in place: the base
        # model is then the PEFT model with every adapter off.
        if self.peft is None:
            return self.base
        from .adapters import AdapterView

        return AdapterView(self.peft, None if adapter_path is None else self.adapter_names[adapter_path])

    def _served(self, adapter_path: str | None) -> ServedModel:
        if self.inner_backend == "vllm":
            return self.engine.model(adapter_path)
        from .transformers_backend import TransformersModel

        model = self._transformers_model(adapter_path)
        return TransformersModel(model, self.tokenizer, self.model_id, max_batch_tokens=self.spec.max_batch_tokens)


def vllm_generate(served, prompts: Sequence[str], row_seeds: Sequence[int], params: SamplingParams, batch_size: int):
    """The vllm backend's generate with each row's seed given (its own seeds rows by their index in the call)."""
    import vllm

    ids = [served.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    per_row = [
        vllm.SamplingParams(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p if params.do_sample else 1.0,
            seed=s,
        )
        for s in row_seeds
    ]
    out = []
    # _run: the vllm backend's batching of engine calls (batch_size prompts per call).
    for result in served._run(ids, per_row, None, batch_size):
        completion = result.outputs[0]
        out.append(Generation(completion.text, len(completion.token_ids), completion.finish_reason == "length"))
    return out


# ---------------------------------------------------------------------------------------------
# The head


@dataclass(frozen=True)
class NodeOf:
    """Where an actor runs."""

    node_id: str
    ip: str

    def __str__(self) -> str:
        return f"node {self.node_id[:12]} ({self.ip})"


@dataclass
class Replica:
    actor: object  # ray.actor.ActorHandle
    node: NodeOf
    alive: bool = True


def contiguous_slices(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous slices of n rows, sizes differing by at most one; no empty slice."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _actor_lost_errors(ray) -> tuple[type[BaseException], ...]:
    # ActorDiedError and ActorUnavailableError are RayActorErrors, and a lost node's actors raise
    # them; a result stored on the lost node's object store before it was fetched is an ObjectLostError.
    return (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class ReplicaPool:
    """The step's actors. `models(adapters)` gives {label: RayServedModel}; `close` kills the actors
    (and stops the Ray this pool started or connected)."""

    def __init__(self, ray, replicas: list[Replica], tokenizer, settings: RaySettings, owns_connection: bool):
        self.ray, self.replicas, self.tokenizer, self.settings = ray, replicas, tokenizer, settings
        self.owns_connection = owns_connection
        self.adapter_paths: set[str] = set()
        self.lost: list[NodeOf] = []
        self.rows_done: Counter[NodeOf] = Counter()  # rows each actor returned, by its node

    def models(self, adapters: Mapping[str, str | None]) -> dict[str, RayServedModel]:
        """{label: model} over this pool's actors; adapters not loaded yet are loaded on every actor."""
        new = sorted({p for p in adapters.values() if p is not None} - self.adapter_paths)
        if new:
            self._on_every_actor("add_adapters", new)
            self.adapter_paths |= set(new)
        out = {}
        for label, path in adapters.items():
            inner = self._on_one_actor("provenance", path)
            provenance = Provenance("ray", f"ray {self.ray.__version__} + {inner.engine_version}", inner.served_model)
            out[label] = RayServedModel(self, path, provenance)
        return out

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def map_rows(
        self,
        method: str,
        columns: Sequence[Sequence],
        shared_before: tuple = (),
        shared_after: tuple = (),
        on_slice_done: Callable[[int], None] | None = None,
        whole: bool = False,
    ) -> list:
        """`method` of the actors over the rows of `columns` (per-row lists of equal length), split
        into contiguous slices, one per live actor (`whole`: one slice), called as
        method(*shared_before, *slices of columns, *shared_after); the results in row order."""
        n = len(columns[0])
        if n == 0:
            return []
        bounds = contiguous_slices(n, 1 if whole else len(self.live()))
        results: list[list | None] = [None] * len(bounds)
        in_flight: dict[object, tuple[int, Replica]] = {}

        def submit(i: int, replica: Replica) -> None:
            start, end = bounds[i]
            args = (*shared_before, *(list(c[start:end]) for c in columns), *shared_after)
            in_flight[getattr(replica.actor, method).remote(*args)] = (i, replica)

        for i, replica in enumerate(self._spread(len(bounds))):
            submit(i, replica)
        while in_flight:
            [ref], _ = self.ray.wait(list(in_flight), num_returns=1)
            i, replica = in_flight.pop(ref)
            try:
                results[i] = self.ray.get(ref)
            except _actor_lost_errors(self.ray) as exc:
                self._mark_lost(replica, exc)
                submit(i, self._least_busy([r for _, r in in_flight.values()]))
                continue
            self.rows_done[replica.node] += bounds[i][1] - bounds[i][0]
            if on_slice_done is not None:
                on_slice_done(bounds[i][1] - bounds[i][0])
        return [row for part in results for row in part]

    def close(self) -> None:
        for replica in self.replicas:
            try:
                self.ray.kill(replica.actor)
            except Exception:  # an actor of a lost node is gone already
                pass
        self.replicas = []
        if self.owns_connection and self.ray.is_initialized():
            self.ray.shutdown()

    def _on_one_actor(self, method: str, *args):
        """`method` on one live actor, on another if that one is lost."""
        while True:
            replica = self._require_live()[0]
            try:
                return self.ray.get(getattr(replica.actor, method).remote(*args))
            except _actor_lost_errors(self.ray) as exc:
                self._mark_lost(replica, exc)

    def _on_every_actor(self, method: str, *args) -> None:
        """`method` on every live actor (loading an adapter); a lost actor drops out of the pool."""
        calls = [(r, getattr(r.actor, method).remote(*args)) for r in self.live()]
        for replica, ref in calls:
            try:
                self.ray.get(ref)
            except _actor_lost_errors(self.ray) as exc:
                self._mark_lost(replica, exc)
        self._require_live()

    def _spread(self, n: int) -> list[Replica]:
        live = self._require_live()
        return [live[i % len(live)] for i in range(n)]

    def _least_busy(self, busy: list[Replica]) -> Replica:
        live = self._require_live()
        return min(live, key=lambda r: sum(b is r for b in busy))

    def _require_live(self) -> list[Replica]:
        live = self.live()
        if not live:
            nodes = ", ".join(str(n) for n in self.lost)
            raise ReplicasLost(
                f"all {len(self.replicas)} Ray actor(s) of this step are lost (lost: {nodes}); no row of the call is "
                "returned, and the stage's pending batches run on its next run"
            )
        return live

    def _mark_lost(self, replica: Replica, exc: BaseException) -> None:
        replica.alive = False
        self.lost.append(replica.node)
        try:
            # An actor that is only unreachable may come back and run on: its rows are no longer wanted.
            self.ray.kill(replica.actor)
        except Exception:  # gone with its node
            pass
        log.warning(
            "Ray actor on %s lost (%s); its rows run again on the %d surviving actor(s)",
            replica.node,
            type(exc).__name__,
            len(self.live()),
        )


class RayServedModel(ServedModel):
    """One model (the base model, or it with one adapter) served by a ReplicaPool."""

    capabilities = ALL_CAPABILITIES

    def __init__(self, pool: ReplicaPool, adapter_path: str | None, provenance: Provenance, merged: bool = False):
        self.pool, self.adapter_path, self.provenance, self.merged = pool, adapter_path, provenance, merged
        self.tokenizer = pool.tokenizer

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        batch_size: int = 8,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        stop_after_first_line: bool = False,
    ) -> list[Generation]:
        if not prompts:
            return []
        if seed is None:
            seed = secrets.randbelow(2**31 - 1)
        seeds = [row_seed(seed, k) for k in range(len(prompts))]
        return self.pool.map_rows(
            "generate",
            [list(prompts), seeds],
            shared_before=(self.adapter_path, self.merged),
            shared_after=(params, batch_size, seed, stop_after_first_line),
            on_slice_done=_progress_counter(progress, len(prompts), batch_size),
            whole=self._needs_whole_call(prompts),
        )

    def continuation_logprobs(self, contexts, continuations, batch_size: int = 8) -> list[list[float]]:
        return self.pool.map_rows(
            "continuation_logprobs",
            [list(contexts), list(continuations)],
            shared_before=(self.adapter_path,),
            shared_after=(batch_size,),
        )

    def next_token_distribution(self, contexts, candidate_tokens, batch_size: int = 8) -> list[list[float]]:
        return self.pool.map_rows(
            "next_token_distribution",
            [list(contexts)],
            shared_before=(self.adapter_path,),
            shared_after=(list(candidate_tokens), batch_size),
        )

    @contextmanager
    def for_generation(self) -> Iterator[ServedModel]:
        # As the transformers backend: the adapter merged into the weights for generation (in each actor).
        yield RayServedModel(self.pool, self.adapter_path, self.provenance, merged=True)

    def _needs_whole_call(self, prompts: Sequence[str]) -> bool:
        """A prompt under 2 tokens sends the transformers backend to model.generate, whose sampling
        depends on the batch: then the call stays whole, on one actor, as in process."""
        if self.pool.settings.inner_backend != "transformers":
            return False
        return min(len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]) < 2


def _progress_counter(progress: ProgressFn | None, total_rows: int, batch_size: int) -> Callable[[int], None] | None:
    """on_slice_done for map_rows: finished rows reported as progress(done, total, seconds) in batch units."""
    if progress is None:
        return None
    started, done = time.monotonic(), [0]
    total = -(-total_rows // batch_size)

    def finished(rows: int) -> None:
        done[0] += rows
        progress(-(-done[0] // batch_size), total, time.monotonic() - started)

    return finished


# ---------------------------------------------------------------------------------------------
# Opening a pool


def open_ray_pool(
    spec: ReplicaSpec, settings: RaySettings, tokenizer, adapters: Mapping[str, str | None] | None = None
) -> ReplicaPool:
    """Connects to (or starts) Ray, checks the cluster can hold the actors, starts them on distinct
    nodes where it can, and loads the model and the adapters in each. RayClusterError when the
    cluster cannot be reached or cannot hold them (the actors started are killed again)."""
    if settings.inner_backend not in INNER_BACKENDS:
        choices = ", ".join(INNER_BACKENDS)
        raise ModelUnavailable(f"ray_inner_backend must be one of {choices}, got {settings.inner_backend!r}")
    ray = import_ray()
    owns_connection = connect(ray, settings.address)
    try:
        check_capacity(ray, settings)
        replicas = start_replicas(ray, spec, settings)
    except BaseException:
        if owns_connection:
            ray.shutdown()
        raise
    pool = ReplicaPool(ray, replicas, tokenizer, settings, owns_connection)
    paths = sorted({p for p in (adapters or {}).values() if p is not None})
    try:
        ray.get([r.actor.load.remote(paths) for r in replicas])
    except BaseException:
        pool.close()
        raise
    pool.adapter_paths = set(paths)
    return pool


def open_ray_models(
    spec: ReplicaSpec, settings: RaySettings, tokenizer, adapters: Mapping[str, str | None]
) -> tuple[dict[str, RayServedModel], ReplicaPool]:
    """({label: model}, pool) for a step: a label mapped to None is the base model, any other to
    the LoRA adapter at its path (which every node must see)."""
    pool = open_ray_pool(spec, settings, tokenizer, adapters)
    return pool.models(adapters), pool


def connect(ray, address: str | None) -> bool:
    """Joins the cluster at `address` (None: RAY_ADDRESS, else a new local Ray); True when this
    call connected (so the pool disconnects at close), False when the process already was."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target not in ("auto", "local"):
        check_reachable(target)
    # A Ray started here needs no dashboard (plain ray has none); one joined keeps its own.
    starts_here = not target or target == "local"
    ray.init(address=address, logging_level="WARNING", **({"include_dashboard": False} if starts_here else {}))
    return True


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """RayClusterError naming `address` unless its host answers on its port within timeout_s."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"ray_address {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayClusterError(
            f"cannot reach the Ray cluster at {address!r} within {timeout_s:g} s ({exc}); is `ray start --head` "
            "running there, and its port open from this machine?"
        ) from None


def actors_that_fit(node_resources: Mapping[str, float], cpus: int, gpus: float) -> int:
    fit = math.floor(node_resources.get("CPU", 0) / cpus)
    if gpus > 0:
        fit = min(fit, math.floor(node_resources.get("GPU", 0) / gpus + 1e-9))
    return fit


def check_capacity(ray, settings: RaySettings) -> None:
    """RayClusterError when the cluster's nodes, empty, could not hold the actors asked for."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fit = sum(actors_that_fit(n["Resources"], settings.cpus_per_actor, settings.gpus_per_actor) for n in nodes)
    if fit >= settings.actors:
        return
    raise RayClusterError(
        f"the ray backend asked for {_ask(settings)}; the cluster has {_cluster_text(nodes)}, room for {fit} "
        "such actor(s). Lower ray_actors, ray_cpus_per_actor or ray_gpus_per_actor, or add nodes"
    )


def _ask(settings: RaySettings) -> str:
    gpus = f" and {settings.gpus_per_actor:g} GPU" if settings.gpus_per_actor else ""
    total_gpus = f", {settings.actors * settings.gpus_per_actor:g} GPUs" if settings.gpus_per_actor else ""
    return (
        f"{settings.actors} actor(s) of {settings.cpus_per_actor} CPU{gpus} each "
        f"({settings.actors * settings.cpus_per_actor} CPUs{total_gpus} in all)"
    )


def _cluster_text(nodes: list[dict]) -> str:
    def total(key: str) -> float:
        return sum(n["Resources"].get(key, 0) for n in nodes)

    per_node = "; ".join(
        f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU"
        for n in nodes
    )
    return f"{len(nodes)} node(s) with {total('CPU'):g} CPUs and {total('GPU'):g} GPUs in all ({per_node})"


def start_replicas(ray, spec: ReplicaSpec, settings: RaySettings) -> list[Replica]:
    """The actors, spread over the nodes, each placed within the placement timeout; the ones
    placed are killed again when any is not (a pending actor would hang the step)."""
    actor_class = ray.remote(ModelReplica)
    actors = [
        actor_class.options(
            num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor, scheduling_strategy="SPREAD"
        ).remote(spec, settings.inner_backend, settings.cpus_per_actor)
        for _ in range(settings.actors)
    ]
    refs = [a.node.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=settings.placement_timeout_s)
    if len(ready) < len(refs):
        for actor in actors:
            ray.kill(actor)
        raise RayClusterError(
            f"only {len(ready)} of {settings.actors} Ray actor(s) started within {settings.placement_timeout_s:g} s: "
            f"asked for {_ask(settings)}; free now: {_free_text(ray)} (other work holds the rest)"
        )
    return [Replica(a, NodeOf(**info)) for a, info in zip(actors, ray.get(refs))]


def _free_text(ray) -> str:
    free = ray.available_resources()
    return f"{free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs"
