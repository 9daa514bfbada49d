"""Scripted stand-ins for judge models: fixed logits at known positions, and a record of what they
were given, so the tests can check which positions and tokens a scoring protocol reads."""

from types import SimpleNamespace

import torch


class ScriptedCausalLM(torch.nn.Module):
    """Logit `logits_at_last[token]` at the last position of every row, zero elsewhere."""

    def __init__(self, vocab: int, logits_at_last: dict[int, float]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.vocab, self.logits_at_last = vocab, logits_at_last
        self.seen = []

    def forward(self, input_ids, attention_mask=None, **_):
        self.seen.append(input_ids)
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for token, value in self.logits_at_last.items():
            logits[:, -1, token] = value
        return SimpleNamespace(logits=logits)


class ScriptedSeq2Seq(torch.nn.Module):
    """An encoder-decoder whose first decoder position has a Yes-over-No logit gap; later decoder
    positions favour the opposite answer, so reading the wrong position gives the wrong score."""

    def __init__(self, vocab: int, yes_id: int, no_id: int, gap: float, start_id: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=True, decoder_start_token_id=start_id)
        self.vocab, self.yes_id, self.no_id, self.gap = vocab, yes_id, no_id, gap
        self.seen = []

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, **_):
        self.seen.append((input_ids, decoder_input_ids))
        logits = torch.zeros(input_ids.shape[0], decoder_input_ids.shape[1], self.vocab)
        logits[:, 0, self.yes_id] = self.gap
        logits[:, 1:, self.no_id] = 10.0
        # Mass on another token: the score must renormalise over Yes and No only.
        other = next(i for i in range(self.vocab) if i not in (self.yes_id, self.no_id))
        logits[:, :, other] = 5.0
        return SimpleNamespace(logits=logits)
