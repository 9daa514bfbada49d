"""A decode loop for Hugging Face causal LMs that computes nothing for rows that have ended.

`model.generate` runs every row of a batch until the longest one ends, and samples with a full
sort of the vocabulary; at batch 64 on 2 CPU cores half of its positions were padding after a
row's end and the sort took longer than the forward pass (docs/measurements.md). Here:

- a row leaves the batch (its key/value cache rows are dropped) as soon as it ends;
- waiting prompts join the running batch as places free up (continuous batching), their prompt
  prefilled apart and its cache left-padded into the batch's, so the batch stays full;
- rows in flight are bounded by `max_rows` and by `max_batch_tokens`, the cache positions of the
  batch (rows x width), so long prompts run in smaller batches instead of taking more memory;
- sampling is sampling.py's exact nucleus draw, each row with its own random stream (the caller
  passes one seed per prompt: `row_seed` in backend.py, as the vllm and openai backends seed rows),
  so a row's text does not depend on which rows share its batch.

transformers' own continuous batching (`generate_batch`) took twice as long as `generate` here
(docs/measurements.md), so this loop is ours. It uses the public cache API (DynamicCache,
batch_select_indices); rows join a running batch only when every cache layer is a plain
DynamicLayer (otherwise prompts wait until the batch has emptied, and rows still leave it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .backend import SamplingParams
from .generation import position_ids
from .retry import Backoff, call_with_retry

# Prefill at most this many prompt positions per forward pass (rows x width): the attention of a
# long prompt is quadratic in its width, so a group of long prompts is prefilled a few at a time.
PREFILL_TOKENS = 8192


@dataclass
class Decoded:
    tokens: list[int]  # the generated tokens before the end-of-sequence token
    hit_token_limit: bool  # no end-of-sequence token within max_new_tokens


@dataclass
class _Batch:
    """The rows in flight: row r feeds feed[r] at position positions[r] next, after the cache's
    columns where mask[r] is 1."""

    cache: object = None
    mask: object = None
    feed: object = None
    positions: object = None
    prompts: list[int] = field(default_factory=list)  # the prompt index of each row

    def __len__(self) -> int:
        return len(self.prompts)


def decode(
    model,
    prompt_ids: Sequence[list[int]],
    params: SamplingParams,
    *,
    eos_ids: set[int],
    pad_id: int,
    max_rows: int,
    max_batch_tokens: int,
    seeds: Sequence[int],
    stops_row: Callable[[list[int], int], bool] | None = None,
    on_finished: Callable[[int], None] | None = None,
    backoff: Backoff | None = None,
    prefilled: tuple | None = None,
) -> list[Decoded]:
    """Generate after each prompt (token ids, at least 2 each) in `prompt_ids`; results in prompt
    order. Prompt k samples from its own random stream, seeded with seeds[k]. `stops_row(tokens, last)`
    may end a row early (its last token kept). `on_finished(n)` is called with the number of
    prompts done each time one finishes. A forward pass that raises a transient error (retry.py)
    is tried again on the cache as it was before it. `prefilled` (cache, mask): every prompt's
    cache of all its tokens but the last, already computed (left-padded, in prompt order); the
    batch starts from it instead of prefilling."""
    import torch

    if any(len(p) < 2 for p in prompt_ids):
        raise ValueError("decode needs prompts of at least two tokens (one to prefill, one to feed)")
    device = next(model.parameters()).device
    streams = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out: list[list[int]] = [[] for _ in prompt_ids]
    done: list[Decoded | None] = [None] * len(prompt_ids)
    # Longest first: prompts that join together have similar widths, and short ones fill the end.
    waiting = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    batch = _Batch()
    if prefilled is not None:
        cache, mask = prefilled
        batch = _Batch(
            cache,
            mask,
            torch.tensor([p[-1] for p in prompt_ids], device=device),
            mask.sum(dim=1),
            list(range(len(prompt_ids))),
        )
        waiting = []
    can_merge = cache_is_mergeable(model)
    forward = _retrying(model, backoff, can_merge)
    finished = 0
    with torch.no_grad():
        while waiting or len(batch):
            joining = _admit(batch, waiting, prompt_ids, max_rows, max_batch_tokens, params.max_new_tokens, can_merge)
            if joining:
                _join(forward, batch, [waiting.pop(0) for _ in range(joining)], prompt_ids, pad_id, device, can_merge)
            logits = _step(forward, batch)
            if params.do_sample:
                uniforms = torch.stack([torch.rand((), generator=streams[p]) for p in batch.prompts])
                tokens = _sample(logits, params, uniforms)
            else:
                tokens = torch.argmax(logits, dim=-1)
            keep = []
            for r, (p, t) in enumerate(zip(batch.prompts, tokens.tolist())):
                if t in eos_ids:
                    done[p] = Decoded(out[p], False)
                else:
                    out[p].append(t)
                    if len(out[p]) >= params.max_new_tokens:
                        done[p] = Decoded(out[p], True)
                    elif stops_row is not None and stops_row(out[p], t):
                        done[p] = Decoded(out[p], False)
                if done[p] is None:
                    keep.append(r)
                else:
                    finished += 1
                    if on_finished is not None:
                        on_finished(finished)
            batch.feed = tokens.to(device)
            if len(keep) < len(batch):
                _keep_rows(batch, keep, device)
    return done


def _sample(logits, params: SamplingParams, uniforms):
    from .sampling import sample_next_tokens

    return sample_next_tokens(logits, params.temperature, params.top_p, uniforms)


def _admit(
    batch: _Batch, waiting: list[int], prompt_ids, max_rows: int, max_tokens: int, max_new: int, can_merge: bool
) -> int:
    """How many waiting prompts join now. A join costs a prefill and a copy of the cache, so
    prompts join in groups (a quarter of max_rows, or all that wait), and only while the batch at
    its widest (every row at max_new_tokens) stays within max_tokens; an empty batch takes at
    least one. A cache that cannot be merged takes prompts only when the batch is empty."""
    free = max_rows - len(batch)
    if not waiting or free <= 0:
        return 0
    if len(batch) and (not can_merge or free < min(len(waiting), max(1, max_rows // 4))):
        return 0
    width = batch.mask.shape[1] if len(batch) else 0
    n = 0
    while n < min(free, len(waiting)):
        widest = max(width, len(prompt_ids[waiting[0]])) + max_new  # waiting[0]: the longest waiting
        if (len(batch) + n + 1) * widest > max_tokens and (n or len(batch)):
            break
        n += 1
    return n


def _mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _retrying(model, backoff: Backoff | None, can_merge: bool):
    """model(**kwargs), tried again after a transient error with the cache cut back to the
    length it had (plain layers only: a sliding-window layer may have dropped positions)."""

    def forward(what: str, **kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and not can_merge:
            return model(**kwargs)
        lengths = [layer.keys.shape[-2] for layer in cache.layers] if cache is not None else None

        def attempt():
            if lengths is not None:
                for layer, n in zip(cache.layers, lengths):
                    if layer.keys.shape[-2] > n:
                        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
            return model(**kwargs)

        return call_with_retry(attempt, what, backoff)

    return forward


def _join(forward, batch: _Batch, rows: list[int], prompt_ids, pad_id: int, device, can_merge: bool) -> None:
    """Prefill `rows` (all but each prompt's last token) and add them to the batch; a few long
    prompts per forward pass where the parts can be merged."""
    import torch

    width = max(len(prompt_ids[i]) - 1 for i in rows)
    per_pass = max(1, PREFILL_TOKENS // width) if can_merge else len(rows)
    for start in range(0, len(rows), per_pass):
        group = rows[start : start + per_pass]
        prefixes = [prompt_ids[i][:-1] for i in group]
        w = max(len(p) for p in prefixes)
        ids = torch.tensor([[pad_id] * (w - len(p)) + p for p in prefixes], device=device)
        mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prefixes], device=device)
        cache = forward(
            f"prefill of {len(group)} prompts",
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        part = _Batch(
            cache,
            mask,
            torch.tensor([prompt_ids[i][-1] for i in group], device=device),
            torch.tensor([len(p) for p in prefixes], device=device),
            list(group),
        )
        _merge(batch, part)


def cache_is_mergeable(model) -> bool:
    """Whether the model's key/value cache is plain DynamicLayers, whose rows can be left-padded
    and joined (not sliding-window or other layer kinds)."""
    from transformers import DynamicCache

    return _mergeable(DynamicCache(config=getattr(model, "config", None)))


def _merge(batch: _Batch, part: _Batch) -> None:
    """Append part's rows to batch, left-padding the narrower cache (keys, values and mask) to the
    wider one's width."""
    import torch

    if not len(batch):
        batch.cache, batch.mask, batch.feed, batch.positions, batch.prompts = (
            part.cache,
            part.mask,
            part.feed,
            part.positions,
            list(part.prompts),
        )
        return
    width = max(batch.mask.shape[1], part.mask.shape[1])
    for a, b in zip(batch.cache.layers, part.cache.layers):
        a.keys = torch.cat([_left_pad(a.keys, width), _left_pad(b.keys, width)], dim=0)
        a.values = torch.cat([_left_pad(a.values, width), _left_pad(b.values, width)], dim=0)
    batch.mask = torch.cat([_left_pad_mask(batch.mask, width), _left_pad_mask(part.mask, width)], dim=0)
    batch.feed = torch.cat([batch.feed, part.feed])
    batch.positions = torch.cat([batch.positions, part.positions])
    batch.prompts += part.prompts


def _left_pad(states, width: int):
    import torch.nn.functional as F

    return F.pad(states, (0, 0, width - states.shape[-2], 0))  # [rows, heads, positions, dim]


def _left_pad_mask(mask, width: int):
    import torch.nn.functional as F

    return F.pad(mask, (width - mask.shape[1], 0))


def _step(forward, batch: _Batch):
    """Feed each row its next token; the next-token logits per row [rows, vocabulary]."""
    import torch

    batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
    logits = forward(
        f"decode step of {len(batch)} rows",
        input_ids=batch.feed.unsqueeze(-1),
        attention_mask=batch.mask,
        position_ids=batch.positions.unsqueeze(-1),
        past_key_values=batch.cache,
        use_cache=True,
    ).logits
    batch.positions = batch.positions + 1
    return logits[:, -1, :]


def _keep_rows(batch: _Batch, keep: list[int], device) -> None:
    """Drop the ended rows, then the cache columns that no remaining row reads (left padding)."""
    import torch

    index = torch.tensor(keep, dtype=torch.long, device=device)
    batch.prompts = [batch.prompts[r] for r in keep]
    if not keep:
        batch.cache = batch.mask = batch.feed = batch.positions = None
        return
    batch.cache.batch_select_indices(index)
    batch.mask, batch.feed, batch.positions = batch.mask[index], batch.feed[index], batch.positions[index]
    unread = int(batch.mask.any(dim=0).int().argmax())
    if unread and _mergeable(batch.cache):
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, unread:], layer.values[:, :, unread:]
        batch.mask = batch.mask[:, unread:]
