"""The paper's judges as feedback components: a reward model for preference, and UniEval-style
Boolean evaluators for naturalness, coherence and understandability. Each loads from a Hugging Face
id (local cache only unless downloads are allowed) or a local directory."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ..llm.backend import render_prompt
from ..llm.generation import next_token_distribution
from ..llm.models import load_tokenizer, model_unavailable, resolve_model_source
from ..llm.prompts import UNIEVAL_QUESTIONS, unieval_chat_question, unieval_seq2seq_input
from .components import request_text

REWARD_MODEL_FORMATS = ("auto", "oasst", "chat", "pair")
_MAX_TOKENS = 2048  # the oasst-rm models were trained on at most 2048 tokens


class RewardModelPreference:
    """A sequence-classification reward model scores the (instruction + input, output) pair.

    The score is the raw reward logit, not a sigmoid of it: reward models are trained on pairwise
    preferences (Bradley-Terry), where only differences of logits mean something (their sigmoid is
    the probability that one answer beats the other). A sigmoid of one logit would squash the well
    and badly rated ends, where RL's within-group comparisons need resolution; the combination
    standardises every component anyway, so the logit's offset and scale do not matter.

    Prompt formats (`prompt_format`):
    - oasst: "<|prompter|>{request}<|endoftext|><|assistant|>{output}<|endoftext|>", the layout the
      OpenAssistant oasst-rm pythia reward models were trained on (chosen by "auto" when the
      tokenizer knows the <|prompter|> token);
    - chat: the tokenizer's chat template with a user and an assistant turn (decoder reward models
      that ship one);
    - pair: the tokenizer's text-pair encoding (request, output), as encoder reward models such as
      OpenAssistant/reward-model-deberta-v3 expect.
    """

    name = "preference"
    method = "reward-model-logit/v1"

    def __init__(self, model, tokenizer, model_id: str, prompt_format: str = "auto", batch_size: int = 8):
        if prompt_format not in REWARD_MODEL_FORMATS:
            raise ValueError(
                f"unknown reward-model prompt format '{prompt_format}' (use one of {REWARD_MODEL_FORMATS})"
            )
        labels = getattr(model.config, "num_labels", 1)
        if labels not in (1, 2):
            raise ValueError(f"reward model '{model_id}' has {labels} output labels; expected 1 (a reward) or 2")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.format = _detect_format(tokenizer) if prompt_format == "auto" else prompt_format
        self.version = self.version_for(model_id)

    @classmethod
    def version_for(cls, model_id: str) -> str:
        return f"{cls.method}:{model_id}"

    def texts(self, instructions, inputs, outputs) -> tuple[list[str], list[str] | None]:
        """What the reward model reads: one text per instance, or (request, output) text pairs."""
        requests = [request_text(i, x) for i, x in zip(instructions, inputs)]
        if self.format == "oasst":
            return [
                f"<|prompter|>{r}<|endoftext|><|assistant|>{o}<|endoftext|>" for r, o in zip(requests, outputs)
            ], None
        if self.format == "chat":
            return [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": r}, {"role": "assistant", "content": o}], tokenize=False
                )
                for r, o in zip(requests, outputs)
            ], None
        return requests, list(outputs)

    def score(self, instructions, inputs, outputs) -> list[float]:
        import torch

        first, second = self.texts(instructions, inputs, outputs)
        device = next(self.model.parameters()).device
        # Chat and oasst texts carry their own special tokens; a text pair needs the tokenizer's.
        special = self.format == "pair"
        scores: list[float] = []
        for start in range(0, len(first), self.batch_size):
            args = [first[start : start + self.batch_size]]
            if second is not None:
                args.append(second[start : start + self.batch_size])
            enc = self.tokenizer(
                *args,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=_MAX_TOKENS,
                add_special_tokens=special,
            ).to(device)
            with torch.no_grad():
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            # Two labels: the log-odds of the positive one, the same scale as a single reward logit.
            reward = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            scores.extend(reward.tolist())
        return scores


def _detect_format(tokenizer) -> str:
    if "<|prompter|>" in tokenizer.get_vocab():
        return "oasst"
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


class UniEvalBoolean:
    """The UniEval protocol: a Boolean question about the response to an evaluator model, and the
    score P(Yes) / (P(Yes) + P(No)) from the evaluator's first answer token.

    An encoder-decoder evaluator (UniEval's T5) reads "question: ... </s> response: ... [</s> task:
    ...]" and the probabilities come from the first decoder position after the start token; a
    causal LM reads the question in its chat template and the next token after it is the answer.
    """

    method = "unieval-boolean/v1"

    def __init__(self, name: str, model, tokenizer, model_id: str, batch_size: int = 8):
        if name not in UNIEVAL_QUESTIONS:
            raise ValueError(f"no UniEval question for '{name}' (have {sorted(UNIEVAL_QUESTIONS)})")
        self.name, self.model, self.tokenizer, self.batch_size = name, model, tokenizer, batch_size
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.yes_no = [_first_token(tokenizer, w) for w in ("Yes", "No")]
        self.version = self.version_for(model_id, name)

    @classmethod
    def version_for(cls, model_id: str, name: str) -> str:
        # The question is part of the method: a reworded question gives other numbers.
        question = hashlib.sha256(UNIEVAL_QUESTIONS[name].encode()).hexdigest()[:8]
        return f"{cls.method}:{model_id}:q-{question}"

    def score(self, instructions, inputs, outputs) -> list[float]:
        requests = [request_text(i, x) for i, x in zip(instructions, inputs)]
        if not self.seq2seq:
            contexts = [
                render_prompt(self.tokenizer, unieval_chat_question(self.name, r, o)) for r, o in zip(requests, outputs)
            ]
            return [
                p[0]
                for p in next_token_distribution(self.model, self.tokenizer, contexts, ["Yes", "No"], self.batch_size)
            ]
        return self._seq2seq_scores([unieval_seq2seq_input(self.name, r, o) for r, o in zip(requests, outputs)])

    def _seq2seq_scores(self, texts: Sequence[str]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        start_id = self.model.config.decoder_start_token_id
        if start_id is None:
            raise ValueError("the encoder-decoder evaluator's config has no decoder_start_token_id")
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=1024,
            ).to(device)
            decoder_input = torch.full((enc["input_ids"].shape[0], 1), start_id, dtype=torch.long, device=device)
            with torch.no_grad():
                logits = (
                    self.model(
                        input_ids=enc["input_ids"],
                        attention_mask=enc["attention_mask"],
                        decoder_input_ids=decoder_input,
                    )
                    .logits[:, 0, :]
                    .float()
                )
            # Softmax over the two answers only equals P(Yes) / (P(Yes) + P(No)) over the vocabulary.
            scores.extend(torch.softmax(logits[:, self.yes_no], dim=-1)[:, 0].tolist())
        return scores


def _first_token(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the evaluator's tokenizer encodes '{word}' as nothing")
    return ids[0]


RESOURCE = "feedback_scorer"  # named in the load errors: where allow_download is set for the judges


def load_reward_model(model: str, device: str, allow_download: bool = False, cache_dir=None):
    """(model, tokenizer, model_id) of a sequence-classification reward model."""
    from transformers import AutoModelForSequenceClassification

    from .oasst_reward_model import register_oasst_reward_model

    register_oasst_reward_model()  # the oasst-rm pythia checkpoints use their own model type
    source = resolve_model_source(model, cache_dir, allow_download)
    tokenizer = load_tokenizer(source, padding_side=None, what="reward model", resource=RESOURCE)
    try:
        loaded = AutoModelForSequenceClassification.from_pretrained(source.path, local_files_only=source.local_only)
    except (OSError, ValueError) as exc:
        raise model_unavailable(source, exc, "reward model", RESOURCE) from None
    if loaded.config.pad_token_id is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id  # batches need it to find each last token
    return loaded.to(device).eval(), tokenizer, source.model_id


def load_evaluator(model: str, device: str, allow_download: bool = False, cache_dir=None):
    """(model, tokenizer, model_id) of a UniEval-style evaluator: seq2seq (T5) or causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = resolve_model_source(model, cache_dir, allow_download)
    try:
        config = AutoConfig.from_pretrained(source.path, local_files_only=source.local_only)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        tokenizer = load_tokenizer(source, padding_side=None, what="evaluator", resource=RESOURCE)
        loaded = cls.from_pretrained(source.path, local_files_only=source.local_only)
    except (OSError, ValueError) as exc:
        raise model_unavailable(source, exc, "evaluator", RESOURCE) from None
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # the answer is read at the last position
    return loaded.to(device).eval(), tokenizer, source.model_id
