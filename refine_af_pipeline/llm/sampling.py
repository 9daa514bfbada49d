"""Exact nucleus (top-p) sampling without sorting the vocabulary.

transformers' top-p warper sorts all 49,152 logits of every row at every step; at batch 64 on
2 CPU cores that took longer than the model's forward pass (docs/measurements.md). The nucleus is
the smallest set of most likely tokens whose probability reaches top_p, so it lies inside the k
most likely tokens as soon as those k hold top_p of the mass: `torch.topk` with a k that doubles
until that holds gives the same set, and the same distribution, as the full sort.

Same rule as transformers' TopPLogitsWarper: a token is kept when the probability of the tokens
ranked above it is below top_p (the most likely token is always kept). Temperature divides the
logits first, as transformers' temperature warper does before top-p.
"""

from __future__ import annotations

FIRST_K = 64  # the nucleus of a 0.7-temperature step of the embedded model is almost always inside it


def nucleus_candidates(logits, top_p: float, first_k: int = FIRST_K):
    """(probabilities, token ids) of the k most likely tokens per row, descending, with the
    probability of every token outside its row's nucleus set to 0. `logits` is [rows, vocabulary]
    (already divided by the temperature); k is the smallest power-of-two multiple of `first_k`
    that holds every row's nucleus (the whole vocabulary at most)."""
    import torch

    vocabulary = logits.shape[-1]
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    k = min(first_k, vocabulary)
    while True:
        top_logits, top_ids = torch.topk(logits, k, dim=-1)
        probs = torch.exp(top_logits - log_total)
        above = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        # Every row's nucleus ends inside the k when the k's mass reaches top_p (then the next
        # token's mass above is >= top_p and it is out), or when k is the whole vocabulary.
        if k == vocabulary or bool((above[:, -1] + probs[:, -1] >= top_p).all()):
            return probs.masked_fill(above >= top_p, 0.0), top_ids
        k = min(2 * k, vocabulary)


def pick_by_uniform(probs, ids, uniforms):
    """Inverse-CDF draw: per row, the token whose cumulative share of the row's kept probability
    first exceeds the row's uniform in [0, 1). `probs` [rows, k] (zeros for tokens not allowed)."""
    import torch

    cumulative = torch.cumsum(probs, dim=-1)
    # The uniforms come from per-row CPU generators; the probabilities may be on an accelerator.
    targets = uniforms.to(device=cumulative.device, dtype=cumulative.dtype).unsqueeze(-1) * cumulative[:, -1:]
    position = (cumulative <= targets).sum(dim=-1, keepdim=True)
    # Rounding can put the target at or past the total: take the last token that has probability.
    last_allowed = probs.shape[-1] - 1 - torch.flip(probs > 0, dims=[-1]).int().argmax(dim=-1, keepdim=True)
    position = torch.minimum(position, last_allowed)
    return ids.gather(-1, position).squeeze(-1)


def sample_next_tokens(logits, temperature: float, top_p: float, uniforms):
    """One token per row of `logits` [rows, vocabulary], drawn from the temperature- and
    nucleus-shaped distribution with the row's uniform in [0, 1) (so each row's draw depends on
    its own random stream only)."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    if top_p >= 1.0:
        import torch

        probs = torch.softmax(scaled, dim=-1)
        ids = torch.arange(scaled.shape[-1], device=scaled.device).expand_as(probs)
        return pick_by_uniform(probs, ids, uniforms)
    probs, ids = nucleus_candidates(scaled, top_p)
    return pick_by_uniform(probs, ids, uniforms)


def nucleus_logits_processor(top_p: float, temperature: float = 1.0):
    """A transformers LogitsProcessor that divides the logits by `temperature` and sets every
    logit outside the top-p nucleus to -inf, found with `nucleus_candidates` instead of a sort. For
    generate() calls we do not own (TRL's rollouts): transformers applies a caller's processors
    before its own temperature and top-p warpers, so the caller's temperature and top_p must be set
    to 1.0 (`sampling_settings_for`); then transformers samples the same distribution as with its
    own warpers."""
    import torch
    from transformers import LogitsProcessor

    class NucleusLogitsProcessor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scaled = scores.float() / temperature if temperature != 1.0 else scores.float()
            probs, ids = nucleus_candidates(scaled, top_p)
            kept = torch.full_like(scaled, float("-inf"))
            return kept.scatter(-1, ids, scaled.gather(-1, ids).masked_fill(probs == 0, float("-inf"))).to(scores.dtype)

    return NucleusLogitsProcessor()
