"""The openai backend: any OpenAI-compatible completions server (vLLM `serve`, SGLang, llama.cpp
server), one URL or a fleet of them, each server with its own limit of requests in flight.

Prompts are rendered and tokenized here and sent as token ids, so the server scores exactly the
tokens the transformers backend would (no second BOS, no different split of the chat template).
Log-probabilities come from the legacy completions API: `echo` with `logprobs` returns each prompt
token's log-probability, which gives both the continuation scores and, with the candidate token
appended, the next-token distribution. A server that does not return them is configured with
`logprobs=False`, and the judges that need them fail at step start.

One request per prompt, at most `concurrency` in flight on each server (`scoring_concurrency` for
log-probability requests): the server batches them itself (continuous batching), and a request goes
to the least busy server (fleet.Fleet). httpx is the client (the OpenAI SDK retries 408 and 409 too
and cannot reach vLLM's adapter-loading endpoint). Connection errors, timeouts, 429 and 5xx are
retried, at once on another server where one is up; a server failing `down_after` times in a row is
set aside for a cooldown, so a stage goes on while one server lives. Any other error fails at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .backend import ALL_CAPABILITIES, Generation, ProgressFn, Provenance, SamplingParams, TokenScoringModel, row_seed
from .fleet import GENERATE, SCORE, Fleet, FleetDown
from .retry import Backoff, RetriesExhausted, call_with_retry

_RETRIED_STATUS = {429} | set(range(500, 600))
log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """A server answered with an error, or could not be reached (the message names the URL)."""


class _TransientServerError(ServerError, ConnectionError):
    """Worth another try: a ConnectionError, so retry.is_transient retries it."""


@dataclass(frozen=True)
class ServerSettings:
    base_urls: tuple[str, ...]
    api_key: str | None = None
    concurrency: int = 8  # requests in flight per server
    scoring_concurrency: int | None = None  # log-probability requests in flight per server (None: concurrency)
    timeout_s: float = 300.0  # one request; a long generation on a loaded server takes a while
    connect_timeout_s: float = 3.0
    attempts: int = 4  # tries per request, the first included
    logprobs: bool = True
    down_after: int = 3  # transient failures in a row that mark a server down
    cooldown_s: float = 5.0  # a server's first time down; doubles with each marking in a row
    max_cooldown_s: float = 60.0

    def limit(self, kind: str) -> int:
        """Requests of `kind` (fleet.GENERATE or fleet.SCORE) one server takes at once."""
        return (self.scoring_concurrency or self.concurrency) if kind == SCORE else self.concurrency

    def __repr__(self) -> str:  # the key never reaches a log line
        return (
            f"ServerSettings(base_urls={self.base_urls}, api_key={'set' if self.api_key else None}, "
            f"concurrency={self.concurrency})"
        )


class ServerPool:
    """The fleet: one HTTP client, each request sent to a server with a free slot (fleet.Fleet) and
    retried on another when it fails transiently."""

    def __init__(self, settings: ServerSettings):
        import httpx

        if not settings.base_urls:
            raise ValueError("the openai backend needs at least one base URL (e.g. http://127.0.0.1:8000/v1)")
        self.settings = settings
        self.urls = [u.rstrip("/") for u in settings.base_urls]
        self.fleet = Fleet(
            self.urls,
            {kind: settings.limit(kind) for kind in (GENERATE, SCORE)},
            settings.down_after,
            settings.cooldown_s,
            settings.max_cooldown_s,
        )
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        connections = self.capacity(GENERATE) + self.capacity(SCORE) + 4
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )
        # Tries per request; the pauses only where every server up has already failed the request.
        self.backoff = Backoff(attempts=settings.attempts, first_delay_s=0.5, factor=2.0, max_delay_s=8.0)

    def capacity(self, kind: str) -> int:
        """Requests of `kind` the whole fleet takes at once."""
        return self.settings.limit(kind) * len(self.urls)

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        url: str | None = None,
        backoff: Backoff | None = None,
        kind: str = GENERATE,
    ) -> dict:
        """JSON of `method path` on a server of the fleet with a free slot of `kind` (or on `url`
        only), retried on transient failures."""
        backoff = backoff or self.backoff
        if url is not None:
            return self._request_pinned(method, path, body, url, backoff)
        return self._request_on_fleet(method, path, body, kind, backoff)

    def _request_on_fleet(self, method: str, path: str, body: dict | None, kind: str, backoff: Backoff) -> dict:
        tried: list[str] = []
        failed_on: set[str] = set()
        pauses = iter(backoff.delays())
        last_error = ""
        for attempt in range(1, backoff.attempts + 1):
            try:
                server = self.fleet.acquire(kind, avoid=failed_on)
            except FleetDown as down:  # the fleet failed another probe while this request waited
                tried.append(down.url)
                last_error = down.cause
                continue
            tried.append(server.url)
            answered: bool | None = None
            try:
                answer = self._send(method, server.url + path, body)
                answered = True
                return answer
            except _TransientServerError as exc:
                answered, last_error = False, str(exc)
                failed_on.add(server.url)
            except ServerError:
                answered = True  # it answered: the request is wrong, not the server
                raise
            finally:
                self.fleet.release(server, kind, answered, last_error)
            if attempt == backoff.attempts:
                break
            # Another server up takes the retry at once; none up: acquire waits for a cooldown's end.
            if self.fleet.only_failed_servers_up(failed_on):
                pause = next(pauses)
                log.warning(
                    "%s %s failed (try %d of %d: %s); trying again in %.1f s",
                    *(method, path, attempt, backoff.attempts, last_error, pause),
                )
                time.sleep(pause)
        down = self.fleet.down_urls()
        raise ServerError(
            f"{method} {path} failed on {', '.join(dict.fromkeys(tried))} after {len(tried)} tries; the last error: "
            f"{last_error}" + (f"; servers down: {', '.join(down)}" if down else "")
        )

    def _request_pinned(self, method: str, path: str, body: dict | None, url: str, backoff: Backoff) -> dict:
        """On `url` only, outside the fleet's slots and health (the start-up checks, adapter loading)."""
        tries = 0

        def once():
            nonlocal tries
            tries += 1
            return self._send(method, url + path, body)

        try:
            return call_with_retry(once, f"{method} {path}", backoff)
        except RetriesExhausted as exc:
            raise ServerError(
                f"{method} {path} failed on {url} after {tries} tries; the last error: {exc.__cause__}"
            ) from None

    def _send(self, method: str, url: str, body: dict | None) -> dict:
        import httpx

        try:
            response = self.client.request(method, url, json=body)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _TransientServerError(f"cannot reach {url}: {type(exc).__name__}: {exc or 'no answer'}") from None
        if response.status_code in _RETRIED_STATUS:
            raise _TransientServerError(f"{url} answered {response.status_code}: {_error_text(response)}")
        if response.status_code >= 400:
            raise ServerError(f"{url} answered {response.status_code}: {_error_text(response)}")
        try:
            return response.json()
        except ValueError:  # vLLM's adapter loading answers in plain text
            return {"text": response.text}

    def served_models(self) -> dict[str, list[dict]]:
        """URL -> the models it serves (GET /models), each URL asked once with a short budget: an
        unreachable server is named within seconds, not after the generation timeouts."""
        quick = Backoff(attempts=2, first_delay_s=1.0, factor=1.0, max_delay_s=1.0)
        return {url: self.request("GET", "/models", url=url, backoff=quick).get("data", []) for url in self.urls}

    def engine_version(self, models: list[dict]) -> str:
        """The server's engine and version where it says (vLLM: GET /version beside /v1)."""
        owner = next((m.get("owned_by") for m in models if m.get("owned_by")), None) or "openai-compatible server"
        root = self.urls[0].removesuffix("/v1")
        try:
            version = self._send("GET", root + "/version", None).get("version")
        except Exception:
            version = None
        return f"{owner} {version}" if version else f"{owner} (version not reported)"

    def close(self) -> None:
        self.client.close()


def _error_text(response) -> str:
    try:
        payload = response.json()
        message = payload.get("error", payload)
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)[:300]
    except ValueError:
        return response.text[:300]


def adapter_served_name(adapter_path: str) -> str:
    """The name an adapter folder is served under: the stage that wrote it and a digest of its
    weights, so a folder rewritten with other weights is never answered from the server's copy of
    the old ones."""
    folder = Path(adapter_path)
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return f"refine-af-{folder.parent.parent.name or 'adapter'}-{digest.hexdigest()[:12]}"


class OpenAIServedModel(TokenScoringModel):
    """One served model name on the fleet (the base model, or a LoRA adapter served by name)."""

    def __init__(self, pool: ServerPool, served_model: str, tokenizer, engine_version: str):
        self.pool, self.tokenizer = pool, tokenizer
        self.provenance = Provenance("openai", engine_version, served_model)
        self.capabilities = ALL_CAPABILITIES if pool.settings.logprobs else frozenset({"generate"})

    def _map(
        self, fn, items: Sequence, progress: ProgressFn | None = None, batch_size: int = 8, workers: int | None = None
    ) -> list:
        """fn over items with `workers` (default: enough to fill every server's generation slots)
        requests in flight, results in item order; progress per `batch_size` items done. The fleet's
        slots keep each server within its limit."""
        started, total = time.monotonic(), -(-len(items) // batch_size) if items else 0
        out = []
        with ThreadPoolExecutor(max_workers=workers or self.pool.capacity(GENERATE)) as pool:
            for k, result in enumerate(pool.map(fn, items), start=1):
                out.append(result)
                if progress is not None and (k % batch_size == 0 or k == len(items)):
                    progress(-(-k // batch_size), total, time.monotonic() - started)
        return out

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        batch_size: int = 8,
        seed: int | None = None,
        progress: ProgressFn | None = None,
        stop_after_first_line: bool = False,
    ) -> list[Generation]:
        def one(k_prompt):
            k, prompt = k_prompt
            body = dict(
                model=self.provenance.served_model,
                max_tokens=params.max_new_tokens,
                prompt=self.tokenizer(prompt, add_special_tokens=False)["input_ids"],
                temperature=params.temperature if params.do_sample else 0.0,
                top_p=params.top_p if params.do_sample else 1.0,
            )
            if seed is not None:
                body["seed"] = row_seed(seed, k)  # one stream per row: a row's text does not depend on the others
            answer = self.pool.request("POST", "/completions", body)
            choice = answer["choices"][0]
            text = choice.get("text", "")
            # One prompt per request, so the usage is this row's; a server without usage: count here.
            n_tokens = (answer.get("usage") or {}).get("completion_tokens")
            if n_tokens is None:
                n_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return Generation(text, int(n_tokens), choice.get("finish_reason") == "length")

        return self._map(one, list(enumerate(prompts)), progress, batch_size)

    def _sequence_logprobs(self, sequences: Sequence[tuple[list[int], int]], batch_size: int) -> list[list[float]]:
        def one(seq):
            ids, n = seq
            if n == 0:
                return []
            body = dict(
                model=self.provenance.served_model, prompt=ids, max_tokens=1, temperature=0.0, echo=True, logprobs=0
            )
            choice = self.pool.request("POST", "/completions", body, kind=SCORE)["choices"][0]
            values = (choice.get("logprobs") or {}).get("token_logprobs")
            if not values or len(values) < len(ids):
                raise ServerError(
                    f"{self.pool.urls} returned no prompt log-probabilities for {self.provenance.served_model} "
                    "(echo with logprobs); set the resource's server_logprobs to false for this server"
                )
            return [math.nan if v is None else float(v) for v in values[len(ids) - n : len(ids)]]

        return self._map(one, list(sequences), None, batch_size, self.pool.capacity(SCORE))

    def close(self) -> None:
        pass  # the pool is shared by every model of the fleet; OpenAIFleet closes it


class OpenAIFleet:
    """Opens served models on the fleet: checks that every URL answers and serves the model,
    loads pipeline-trained adapters onto servers that allow it."""

    def __init__(
        self, settings: ServerSettings, tokenizer, served_model: str | None = None, load_adapters: bool = True
    ):
        self.pool = ServerPool(settings)
        self.tokenizer, self.load_adapters = tokenizer, load_adapters
        try:
            self.models = self.pool.served_models()
        except ServerError as exc:
            self.pool.close()
            raise ServerError(f"the openai backend cannot reach its server: {exc}") from None
        names = {url: [m.get("id") for m in models] for url, models in self.models.items()}
        first_url = self.pool.urls[0]
        self.base_name = served_model or (names[first_url][0] if names[first_url] else None)
        for url, served in names.items():
            if self.base_name not in served:
                self.pool.close()
                raise ServerError(
                    f"the server at {url} does not serve the model {self.base_name!r} (it serves "
                    f"{', '.join(map(repr, served)) or 'nothing'}); set served_model_name"
                )
        self.engine_version = self.pool.engine_version(self.models[first_url])

    def model(self, adapter_path: str | None = None) -> OpenAIServedModel:
        name = self.base_name if adapter_path is None else self._adapter(adapter_path)
        return OpenAIServedModel(self.pool, name, self.tokenizer, self.engine_version)

    def _adapter(self, adapter_path: str) -> str:
        name = adapter_served_name(adapter_path)
        for url in self.pool.urls:
            if name in [m.get("id") for m in self.models[url]]:
                continue
            if not self.load_adapters:
                raise ServerError(
                    f"the server at {url} does not serve the adapter {adapter_path} as {name!r}; serve "
                    f"it under that name (vllm serve ... --enable-lora --lora-modules {name}={adapter_path})"
                )
            try:
                self.pool.request(
                    "POST",
                    "/load_lora_adapter",
                    {"lora_name": name, "lora_path": str(adapter_path)},
                    url=url.removesuffix("/v1") + "/v1",
                )
            except ServerError as exc:
                raise ServerError(
                    f"the server at {url} does not serve the adapter {adapter_path} as {name!r} and did not load it "
                    f"({exc}); start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on a machine "
                    f"that sees that folder, or serve it with --lora-modules {name}={adapter_path}"
                ) from None
        return name

    def close(self) -> None:
        self.pool.close()
