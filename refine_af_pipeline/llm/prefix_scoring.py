"""Generate after a prompt and score given continuations of the same prompt from one prefill.

The evaluation asks two things of every prompt: the model's greedy answer and the log-likelihood
of each reference answer. Done apart, the prompt (about 60 tokens; references are about 4) is run
through the model twice; here its key/value cache is computed once and serves both: generation
continues from it, and the references are scored by a forward pass over their own tokens only.
Measured on the embedded model and the built-in tasks (2 CPU cores), scoring the references apart
took about as long as generating the answers.

Written here because transformers has no call that returns both; it relies only on the public
cache API (DynamicCache, batch_select_indices). A model whose cache is not a DynamicCache, or whose
forward takes no position_ids or logits_to_keep, gets the two separate passes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

from .backend import Generation, SamplingParams, row_seed
from .decoding import decode
from .generation import (
    MAX_BATCH_TOKENS,
    continuation_logprobs,
    eos_ids_of,
    first_line_ended,
    forward_module,
    generate,
    length_sorted_batches,
    pad_id_of,
    position_ids,
    supports_decode_loop,
)
from .retry import Backoff, call_with_retry


def generate_and_score_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    params: SamplingParams,
    batch_size: int = 8,
    seed: int | None = None,
    progress=None,
    stop_after_first_line: bool = False,
    backoff: Backoff | None = None,
    score_batch_size: int = 16,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> tuple[list[Generation], list[list[list[float]]]]:
    """(one generation per prompt, per prompt the token log-probabilities of each of its
    continuations), both in input order; the same results as `generate` and
    `continuation_logprobs` up to float rounding. Prompts of similar length share a batch of at
    most batch_size rows and max_batch_tokens positions (prompt and new tokens), so a long prompt
    runs in a small batch. `score_batch_size` continuations are scored per forward pass (each
    holds logits over the vocabulary for all its tokens)."""
    import torch

    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    device = next(model.parameters()).device
    eos_ids = eos_ids_of(model, tokenizer)
    generations: list[Generation | None] = [None] * len(prompts)
    scores: list[list[list[float]] | None] = [None] * len(prompts)
    batches = length_sorted_batches(tokenizer, prompts, batch_size, max_batch_tokens, params.max_new_tokens)
    started = time.monotonic()
    for b, rows in enumerate(batches):

        def run_batch(rows=rows):
            return _generate_and_score_batch(
                model,
                tokenizer,
                [prompts[i] for i in rows],
                [continuations[i] for i in rows],
                params,
                device,
                eos_ids,
                stop_after_first_line,
                score_batch_size,
                [row_seed(seed, i) for i in rows],
                backoff,
            )

        result = call_with_retry(run_batch, f"generation batch {b + 1}/{len(batches)}", backoff)
        if result is None:  # no shareable cache: the two passes apart
            batch_prompts = [prompts[i] for i in rows]
            result = (
                generate(
                    model,
                    tokenizer,
                    batch_prompts,
                    params,
                    len(rows),
                    seed,
                    None,
                    backoff,
                    stop_after_first_line,
                    row_seeds=[row_seed(seed, i) for i in rows],
                ),
                _score_separately(model, tokenizer, batch_prompts, [continuations[i] for i in rows], score_batch_size),
            )
        for i, g, s in zip(rows, *result):
            generations[i], scores[i] = g, s
        if progress is not None:
            progress(b + 1, len(batches), time.monotonic() - started)
    return generations, scores


def _score_separately(model, tokenizer, prompts, continuations, batch_size) -> list[list[list[float]]]:
    flat_ctx = [p for p, conts in zip(prompts, continuations) for _ in conts]
    flat = continuation_logprobs(model, tokenizer, flat_ctx, [c for conts in continuations for c in conts], batch_size)
    out, k = [], 0
    for conts in continuations:
        out.append(flat[k : k + len(conts)])
        k += len(conts)
    return out


def _generate_and_score_batch(
    model,
    tokenizer,
    prompts,
    continuations,
    params,
    device,
    eos_ids,
    stop_after_first_line,
    score_batch_size,
    seeds,
    backoff=None,
):
    import torch
    from transformers import DynamicCache

    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(
        device
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = ids.shape[1]
    if width < 2 or int(mask.sum(dim=1).min()) < 2:
        return None  # a one-token prompt has no prefix to share
    with torch.no_grad(), forward_module(model) as forward_model:
        if not supports_decode_loop(forward_model):
            return None
        # The cache holds every prompt token but the last: generation feeds the last one, and its
        # logits predict each continuation's first token.
        prefix = forward_model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=position_ids(mask[:, :-1]),
            use_cache=True,
            logits_to_keep=1,
        ).past_key_values
        if not isinstance(prefix, DynamicCache):
            return None
        scored = _score_on_prefix(forward_model, tokenizer, prefix, ids, mask, continuations, device, score_batch_size)
        prompt_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        # The batch was sized by its token budget already: all of it decodes together.
        decoded = decode(
            forward_model,
            prompt_ids,
            params,
            eos_ids=eos_ids,
            pad_id=pad_id_of(tokenizer),
            max_rows=len(prompts),
            max_batch_tokens=len(prompts) * (width + params.max_new_tokens),
            seeds=seeds,
            stops_row=first_line_ended(tokenizer) if stop_after_first_line else None,
            prefilled=(prefix, mask[:, :-1]),
            backoff=backoff,
        )
    return [
        Generation(tokenizer.decode(d.tokens, skip_special_tokens=True), len(d.tokens), d.hit_token_limit)
        for d in decoded
    ], scored


def _rows_of(cache, rows):
    """A cache holding `rows` of `cache` (repeats allowed); `cache` itself is left as it was:
    each layer is a new object whose tensors are the indexed copies."""
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    view.batch_select_indices(rows)
    return view


def _score_on_prefix(model, tokenizer, prefix, ids, mask, continuations, device, chunk: int) -> list[list[list[float]]]:
    """Log-probabilities of each continuation after its prompt: one row per (prompt, continuation)
    on that prompt's rows of the prefix cache, fed the last prompt token and the continuation's
    tokens; `chunk` rows per forward pass."""
    import torch

    pairs = [(k, c) for k, conts in enumerate(continuations) for c in conts]
    out: list[list[list[float]]] = [[] for _ in continuations]
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), chunk):
        owners = [k for k, _ in pairs[start : start + chunk]]
        tokens = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in pairs[start : start + chunk]]
        length = 1 + max(len(t) for t in tokens)
        new_ids = torch.tensor(
            [[int(ids[o, -1])] + t + [pad] * (length - 1 - len(t)) for o, t in zip(owners, tokens)], device=device
        )
        new_mask = torch.tensor([[1] * (1 + len(t)) + [0] * (length - 1 - len(t)) for t in tokens], device=device)
        full_mask = torch.cat([mask[owners, :-1], new_mask], dim=1)
        last_prompt_position = mask[owners].sum(dim=1, keepdim=True) - 1
        positions = last_prompt_position + torch.arange(length, device=device).unsqueeze(0)
        cache = _rows_of(prefix, torch.tensor(owners, device=device))
        logits = model(
            input_ids=new_ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits
        for r, (owner, t) in enumerate(zip(owners, tokens)):
            if not t:
                out[owner].append([])
                continue
            row = logits[r, : len(t)].float()
            target = torch.tensor(t, device=device)
            lp = row.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
            out[owner].append(lp.tolist())
    return out
