"""Batched text generation and token scoring with a Hugging Face causal LM."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from .backend import Generation, ProgressFn, SamplingParams
from .retry import Backoff, call_with_retry


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    batch_size: int = 8,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    backoff: Backoff | None = None,
    stop_after_first_line: bool = False,
) -> list[Generation]:
    """Generate one continuation per already-rendered prompt, in batches, keeping prompt order.
    Prompts of similar length share a batch (a padded position costs as much as a real one);
    the results come back in prompt order. A batch whose generate call raises a transient backend
    error is tried again (retry.py). `stop_after_first_line`: a row stops once its first non-empty
    line has ended (for callers that keep only that line; the line itself is the same as without
    stopping)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos_ids = eos_ids_of(model, tokenizer)
    results: list[Generation | None] = [None] * len(prompts)
    started = time.monotonic()
    batches = length_sorted_batches(tokenizer, prompts, batch_size)
    for b, indices in enumerate(batches):
        enc = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        kwargs = generation_kwargs(tokenizer, params, enc["input_ids"].shape[1], stop_after_first_line)

        def run_batch():
            with torch.no_grad():
                return model.generate(**enc, **kwargs)

        out = call_with_retry(run_batch, f"generation batch {b + 1}/{len(batches)}", backoff)
        for i, generation in zip(indices, decode_new_tokens(tokenizer, out[:, enc["input_ids"].shape[1]:], eos_ids)):
            results[i] = generation
        if progress is not None:
            progress(b + 1, len(batches), time.monotonic() - started)
    return results


def generation_kwargs(tokenizer, params: SamplingParams, prompt_width: int, stop_after_first_line: bool) -> dict:
    kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if params.do_sample:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_after_first_line:
        kwargs.update(stopping_criteria=_first_line_ended(tokenizer, prompt_width))
    return kwargs


def decode_new_tokens(tokenizer, new_tokens, eos_ids: set[int]) -> list[Generation]:
    """Each row cut at its first end-of-sequence (or pad) token; the rest is padding."""
    results = []
    for row in new_tokens.tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_ids), None)
        kept = row if cut is None else row[:cut]
        results.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept), cut is None))
    return results


def length_sorted_batches(tokenizer, texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of at most batch_size, longest first, so that each batch pads
    little. One batch (len(texts) <= batch_size) keeps the given order."""
    if len(texts) <= batch_size:
        return [list(range(len(texts)))] if texts else []
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _first_line_ended(tokenizer, prompt_width: int):
    """A per-row stop: the new text holds a newline after some non-blank text. transformers pads
    the rows that stopped while the others go on; the cut at the first pad token removes that."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstLineEnded(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([FirstLineEnded()])


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(cfg_eos)
    return {i for i in ids if i is not None}


def position_ids(attention_mask):
    # Left padding: each row's positions start at 0 with its first real token, as in generate().
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _last_logits(model, input_ids, attention_mask, keep: int):
    """Logits of the last `keep` positions only. A [batch, length, vocabulary] tensor for every
    position is the largest allocation of a scoring pass (SmolLM2's 49k vocabulary: 0.2 GB per
    1,000 tokens in fp32), and only the positions that predict the scored tokens are needed."""
    optional = dict(position_ids=position_ids(attention_mask), logits_to_keep=keep)
    while True:
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, **optional)
            break
        except TypeError as exc:
            # A model class without one of these keywords (a custom judge): left padding then
            # relies on its own positions, and all logits are computed.
            dropped = next((k for k in optional if f"'{k}'" in str(exc)), None)
            if dropped is None:
                raise
            optional.pop(dropped)
    return out.logits[:, -keep:, :]


def continuation_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                          batch_size: int = 8) -> list[list[float]]:
    """Log-probability of each continuation token given its context (teacher forcing). A
    continuation token with no context before it has no prediction and is left out."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    all_ctx = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
    all_cont = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    # Similar lengths share a batch (less padding); results go back in input order.
    order = sorted(range(len(contexts)), key=lambda i: -(len(all_ctx[i]) + len(all_cont[i])))
    out: list[list[float]] = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ctx_ids, cont_ids = [all_ctx[i] for i in rows], [all_cont[i] for i in rows]
        seqs = [a + b for a, b in zip(ctx_ids, cont_ids)]
        width = max(len(s) for s in seqs)
        if width == 0:
            continue
        # Left padding puts every continuation at the end, so one `keep` covers all rows.
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        keep = min(max(len(b) for b in cont_ids) + 1, width)
        with torch.no_grad():
            logits = _last_logits(model, input_ids, attention, keep)
            # Kept position j predicts the token at kept position j + 1.
            targets = input_ids[:, width - keep + 1:]
            for k, (a, b) in enumerate(zip(ctx_ids, cont_ids)):
                if not b:
                    continue
                row = logits[k, :keep - 1].float()  # one row at a time: no second batch-sized copy
                lp = row.gather(-1, targets[k].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
                values = lp[keep - 1 - len(b):].tolist() if len(b) < keep else [math.nan] + lp.tolist()
                out[rows[k]] = values if a else values[1:]
    return out


def next_token_distribution(model, tokenizer, contexts: Sequence[str], candidate_tokens: Sequence[str],
                            batch_size: int = 8) -> list[list[float]]:
    """Probabilities of single-token candidates as the next token, renormalised over the candidates."""
    import torch

    cand_ids = []
    for tok in candidate_tokens:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        cand_ids.append(ids[0])
    device = next(model.parameters()).device
    probs: list[list[float] | None] = [None] * len(contexts)
    for rows in length_sorted_batches(tokenizer, contexts, batch_size):
        enc = tokenizer([contexts[i] for i in rows], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
        with torch.no_grad():
            logits = _last_logits(model, enc["input_ids"], enc["attention_mask"], 1)[:, -1, :].float()
        for i, p in zip(rows, torch.softmax(logits[:, cand_ids], dim=-1).tolist()):
            probs[i] = p
    return probs
