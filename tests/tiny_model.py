"""A tiny Llama and byte-level BPE tokenizer that the tests build and briefly train themselves.

Training teaches only the output formats (numbered instruction lists, "Input: ... Output: ..."),
filled with random words, so sampled instructions are new word sequences that pass the filters
and the ROUGE-L de-duplication, and instances parse. No download, about half a minute on 2 cores.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "explain describe list compare summarise rewrite classify suggest plan estimate translate outline "
    "river garden market engine planet recipe letter budget window teacher forest ticket bridge lamp "
    "quiet rapid gentle bright ancient narrow honest fragile modern useful simple careful "
    "two three several many every some few most each which whether before after during with "
    "customer student city team product story question answer reason number habit season"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize()


def _training_texts(rng: random.Random, seed_instructions: list[str], n: int) -> list[str]:
    from refine_af_pipeline.llm.prompts import bootstrap_prompt, instance_prompt

    texts = []
    for k in range(n):
        if k % 2 == 0:
            examples = rng.sample(seed_instructions, 8)
            items = "\n".join(f"{9 + j}. {_words(rng, 5, 10)}" for j in range(rng.randint(2, 4)))
            user, answer = bootstrap_prompt(examples), items[3:]
            prefix = "9."
        else:
            user = instance_prompt(_words(rng, 5, 10))
            answer = f"Input: {_words(rng, 3, 8)}\nOutput: {_words(rng, 3, 8)}"
            prefix = ""
        texts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{prefix}{answer}<|im_end|>")
    return texts


def build_tiny_model(target: Path, steps: int = 150, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from refine_af_pipeline.instructions.seeds import load_seed_tasks

    rng = random.Random(seed)
    torch.manual_seed(seed)
    seeds = [t.instruction for t in load_seed_tasks()]
    texts = _training_texts(rng, seeds, 64)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        texts + seeds,
        trainers.BpeTrainer(
            vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokenizer.padding_side = "right"
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 8), return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tokenizer.padding_side = "left"
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
