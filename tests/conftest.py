"""Tiny models and tokenizers built in-process: nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to core contention

CORPUS = [
    "Q: Lily has 43 cards. She finds 19 more. How many cards now? A: 43 + 19 = 62. The answer is 62.",
    "Q: Tom has 12 apples. He eats 5. How many apples now? A: 12 - 5 = 7. The answer is 7.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , .",
    "Distillation trains a small student to imitate a large teacher.",
    "user: hello assistant: hi there, how can I help you today?",
] * 20


def make_tokenizer(vocab_size: int = 300, chat_template: bool = False):
    """A byte-level BPE tokenizer (any text round-trips) with <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}"
        )
    return fast


def save_sharp_teacher(out, tokenizer, layers: int = 2, seed: int = 1):
    """A random teacher with a 10x head, so its next-token distributions are peaked (a clear target), saved
    with its tokenizer in `out`; returns the model."""
    model = make_llama(len(tokenizer), hidden=64, layers=layers, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model


def make_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama teacher (4 layers, width 64) saved in HF format with its tokenizer."""
    out = tmp_path_factory.mktemp("teacher")
    model = make_llama(len(tokenizer), hidden=64, layers=4)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def prompts_file(tmp_path):
    import json

    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"Q: Tom has {a} apples. He eats {b}. How many apples now? A:", "answer": str(a - b)}
        for a, b in [(12, 5), (20, 3), (9, 4), (15, 7), (30, 11), (8, 2), (44, 13), (17, 9)]
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
