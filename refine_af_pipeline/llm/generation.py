"""Batched text generation and token scoring with a Hugging Face causal LM."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

from .backend import Generation, ProgressFn, SamplingParams, row_seed
from .retry import Backoff, call_with_retry

# Rows x width of the key/value cache a generation batch may reach: 1.5 GB for the embedded model
# in fp32 (46 KB per position); long prompts then run in fewer rows instead of taking more memory.
MAX_BATCH_TOKENS = 32768
# Positions per forward-only scoring pass (judges, likelihoods): rows of similar length share a
# pass, and long texts go fewer at a time.
SCORING_TOKENS = 16384


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
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    row_seeds: Sequence[int] | None = None,
) -> list[Generation]:
    """Generate one continuation per already-rendered prompt, in prompt order, with decoding.py's
    loop: at most `batch_size` rows (and `max_batch_tokens` cache positions) in flight, a row
    leaving as it ends and a waiting prompt taking its place. Prompt k samples from its own stream
    seeded with row_seed(seed, k), so its text does not depend on the other prompts. A forward pass that
    raises a transient backend error is tried again (retry.py). `stop_after_first_line`: a row
    stops once its first non-empty line has ended (for callers that keep only that line; the line
    itself is the same as without stopping). `progress(done, total, seconds)` counts finished
    prompts in units of batch_size. `row_seeds` replaces the per-prompt seeds."""
    import torch

    from .decoding import decode

    if not prompts:
        return []
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    with forward_module(model) as forward_model:
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if min(len(ids) for ids in prompt_ids) < 2 or not supports_decode_loop(forward_model):
            return _generate_with_transformers(
                forward_model, tokenizer, prompts, params, batch_size, seed, progress, backoff, stop_after_first_line
            )
        started, total = time.monotonic(), -(-len(prompts) // batch_size)

        def finished(n: int) -> None:
            if progress is not None and (n % batch_size == 0 or n == len(prompts)):
                progress(-(-n // batch_size), total, time.monotonic() - started)

        decoded = decode(
            forward_model,
            prompt_ids,
            params,
            eos_ids=eos_ids_of(model, tokenizer),
            pad_id=pad_id_of(tokenizer),
            max_rows=batch_size,
            max_batch_tokens=max_batch_tokens,
            seeds=row_seeds or [row_seed(seed, k) for k in range(len(prompts))],
            stops_row=first_line_ended(tokenizer) if stop_after_first_line else None,
            on_finished=finished,
            backoff=backoff,
        )
    return [
        Generation(tokenizer.decode(d.tokens, skip_special_tokens=True), len(d.tokens), d.hit_token_limit)
        for d in decoded
    ]


@contextmanager
def forward_module(model):
    """The module to call: a PEFT AdapterView selects its adapter once for the whole loop instead
    of once per forward pass."""
    selected = getattr(type(model), "selected", None)
    if selected is None:
        yield model
    else:
        with model.selected() as peft:
            yield peft


def supports_decode_loop(model) -> bool:
    """Whether the model's forward can take decoding.py's keywords (position_ids, logits_to_keep,
    past_key_values): named in its signature, or accepted through **kwargs as transformers and PEFT
    models do. A custom class without them (a judge) goes through model.generate."""
    import inspect

    try:
        forward = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in forward.values())
    return takes_any or {"position_ids", "logits_to_keep", "past_key_values"} <= set(forward)


def first_line_ended(tokenizer):
    """stops_row for decoding.decode: the row's text holds a newline after some non-blank text.
    Only a token that brings a newline can end the line, so only then is the row decoded."""

    def stops(tokens: list[int], last: int) -> bool:
        return "\n" in tokenizer.decode([last]) and "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    return stops


def pad_id_of(tokenizer) -> int:
    """The id that left-pads prompts (masked out, so any id serves when the tokenizer has none)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def _generate_with_transformers(
    model, tokenizer, prompts, params, batch_size, seed, progress, backoff, stop_after_first_line
) -> list[Generation]:
    """model.generate in length-sorted batches, with the sort-free nucleus sampler."""
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos_ids = eos_ids_of(model, tokenizer)
    results: list[Generation | None] = [None] * len(prompts)
    started = time.monotonic()
    batches = length_sorted_batches(tokenizer, prompts, batch_size)
    for b, indices in enumerate(batches):
        enc = tokenizer(
            [prompts[i] for i in indices],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(device)
        kwargs = generation_kwargs(tokenizer, params, enc["input_ids"].shape[1], stop_after_first_line)

        def run_batch(enc=enc, kwargs=kwargs):
            with torch.no_grad():
                return model.generate(**enc, **kwargs)

        out = call_with_retry(run_batch, f"generation batch {b + 1}/{len(batches)}", backoff)
        for i, generation in zip(indices, decode_new_tokens(tokenizer, out[:, enc["input_ids"].shape[1] :], eos_ids)):
            results[i] = generation
        if progress is not None:
            progress(b + 1, len(batches), time.monotonic() - started)
    return results


def generation_kwargs(tokenizer, params: SamplingParams, prompt_width: int, stop_after_first_line: bool) -> dict:
    """model.generate's arguments for `params`; temperature and top-p go through the sort-free
    nucleus processor (transformers' own warpers off: it runs a caller's processors before them)."""
    from transformers import LogitsProcessorList

    from .sampling import nucleus_logits_processor

    kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if params.do_sample:
        kwargs.update(
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            logits_processor=LogitsProcessorList([nucleus_logits_processor(params.top_p, params.temperature)]),
        )
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_after_first_line:
        kwargs.update(stopping_criteria=_first_line_stopping(tokenizer, prompt_width))
    return kwargs


def decode_new_tokens(tokenizer, new_tokens, eos_ids: set[int]) -> list[Generation]:
    """Each row cut at its first end-of-sequence (or pad) token; the rest is padding."""
    results = []
    for row in new_tokens.tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_ids), None)
        kept = row if cut is None else row[:cut]
        results.append(Generation(tokenizer.decode(kept, skip_special_tokens=True), len(kept), cut is None))
    return results


def length_sorted_batches(
    tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int | None = None, extra_tokens: int = 0
) -> list[list[int]]:
    """Indices of `texts` in batches, longest first, so that each batch pads little: at most
    batch_size texts, and at most max_tokens positions (rows x (the longest text + extra_tokens,
    the tokens a batch adds to each row)). Texts that fit one batch keep the given order."""
    if not texts:
        return []
    if len(texts) <= batch_size and max_tokens is None:
        return [list(range(len(texts)))]
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    budget = max_tokens if max_tokens is not None else math.inf
    if len(texts) <= batch_size and len(texts) * (max(lengths) + extra_tokens) <= budget:
        return [list(range(len(texts)))]
    return budget_batches(lengths, batch_size, budget, extra_tokens)


def budget_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: float = math.inf, extra_tokens: int = 0
) -> list[list[int]]:
    """Indices by length, longest first, cut into batches of at most batch_size rows and at most
    max_tokens positions (rows x (the batch's longest + extra_tokens)); a longer text than the
    budget is a batch of its own."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        current = batches[-1] if batches else None
        # The batch's first text is its longest: every row is padded to it.
        if (
            current
            and len(current) < batch_size
            and (len(current) + 1) * (lengths[current[0]] + extra_tokens) <= max_tokens
        ):
            current.append(i)
        else:
            batches.append([i])
    return batches


def _first_line_stopping(tokenizer, prompt_width: int):
    """model.generate's per-row stop for stop_after_first_line: the new text holds a newline after
    some non-blank text. transformers pads the rows that stopped while the others go on; the cut
    at the first pad token removes that."""
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
    optional = dict(position_ids=position_ids(attention_mask), logits_to_keep=keep, use_cache=False)
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


def continuation_logprobs(
    model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
) -> list[list[float]]:
    """Log-probability of each continuation token given its context (teacher forcing). A
    continuation token with no context before it has no prediction and is left out."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    all_ctx = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
    all_cont = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    # Similar lengths share a batch (less padding); results go back in input order.
    lengths = [len(a) + len(b) for a, b in zip(all_ctx, all_cont)]
    out: list[list[float]] = [[] for _ in contexts]
    for rows in budget_batches(lengths, batch_size, SCORING_TOKENS):
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
            targets = input_ids[:, width - keep + 1 :]
            for k, (a, b) in enumerate(zip(ctx_ids, cont_ids)):
                if not b:
                    continue
                row = logits[k, : keep - 1].float()  # one row at a time: no second batch-sized copy
                lp = row.gather(-1, targets[k].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
                values = lp[keep - 1 - len(b) :].tolist() if len(b) < keep else [math.nan] + lp.tolist()
                out[rows[k]] = values if a else values[1:]
    return out


def next_token_distribution(
    model, tokenizer, contexts: Sequence[str], candidate_tokens: Sequence[str], batch_size: int = 8
) -> list[list[float]]:
    """Probabilities of single-token candidates as the next token, renormalised over the candidates."""
    import torch

    cand_ids = []
    for tok in candidate_tokens:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        cand_ids.append(ids[0])
    device = next(model.parameters()).device
    probs: list[list[float] | None] = [None] * len(contexts)
    for rows in length_sorted_batches(tokenizer, contexts, batch_size, SCORING_TOKENS):
        enc = tokenizer(
            [contexts[i] for i in rows],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(device)
        with torch.no_grad():
            logits = _last_logits(model, enc["input_ids"], enc["attention_mask"], 1)[:, -1, :].float()
        for i, p in zip(rows, torch.softmax(logits[:, cand_ids], dim=-1).tolist()):
            probs[i] = p
    return probs
