"""Tiny causal LMs built offline for the causal-LM tests: a byte-level BPE tokenizer trained in
the test (no download) and random-init Llama / GPT-2 / GPT-NeoX models (hidden 32, 2 layers)
saved as ordinary Hugging Face folders, plus small alpaca / chat / text data files."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang songs of summer "
         "rain falls softly on green hills where farmers plant wheat corn and beans").split()


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def tokenizer(chat_template: bool = False, bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + ["### Instruction: Input: Response: Assistant: User:"],
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<pad>", bos_token="<s>" if bos else None)
    if chat_template:
        fast.chat_template = CHATML
    return fast


def model(family: str, vocab: int, eos: int):
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=256,
                                            **common))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          **common))
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=256, **common))
    raise ValueError(family)


def model_dir(root: Path, family: str = "llama", chat_template: bool = False,
              bos: bool = False) -> Path:
    d = Path(root) / f"{family}{'-chat' if chat_template else ''}{'-bos' if bos else ''}"
    if (d / "config.json").exists():
        return d
    tok = tokenizer(chat_template, bos)
    m = model(family, len(tok), tok.eos_token_id)
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def alpaca_rows(n: int = 40) -> list[dict]:
    texts = corpus(3 * n, seed=1)
    return [{"instruction": f"repeat: {texts[3 * i]}", "input": texts[3 * i + 1] if i % 2 else "",
             "output": texts[3 * i + 2], "category": f"c{i % 3}", "user": f"u{i % 5}"}
            for i in range(n)]


def chat_rows(n: int = 24) -> list[dict]:
    texts = corpus(4 * n, seed=2)
    return [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": texts[4 * i]},
                          {"role": "assistant", "content": texts[4 * i + 1]},
                          {"role": "user", "content": texts[4 * i + 2]},
                          {"role": "assistant", "content": texts[4 * i + 3]}]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
