"""Tiny judge checkpoints the tests build from configs with seeded weights (no download): a Llama
reward model, an oasst-style GPT-NeoX reward model and a T5 evaluator, each saved with the tiny
Llama's tokenizer. Random weights judge nothing; the tests use them to check loading and protocol."""

from pathlib import Path

import torch


def _tokenizer(tiny_model_dir: Path, extra_special: list[str] | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_special})
    return tokenizer


def build_llama_reward_model(tiny_model_dir: Path, target: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = _tokenizer(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_oasst_reward_model(tiny_model_dir: Path, target: Path, seed: int = 0) -> Path:
    from refine_af_pipeline.feedback.oasst_reward_model import OasstRewardConfig, OasstRewardModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(tiny_model_dir, ["<|prompter|>", "<|assistant|>"])
    config = OasstRewardConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=512,
        pooling="last",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = OasstRewardModel(config)
    with torch.no_grad():
        model.out_proj.bias.fill_(0.25)  # non-zero, so a head that failed to load would show
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_t5_evaluator(tiny_model_dir: Path, target: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = _tokenizer(tiny_model_dir)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
