"""Batched hf teacher generation vs one prompt at a time with `model.generate`: same prompts, same greedy output.

Run as: `OMP_NUM_THREADS=1 python benchmarks/generate_throughput.py [--prompts 64] [--batch-size 32]`

A tiny random Llama (built here, nothing downloaded) and a byte-level BPE tokenizer. Both paths must produce
identical greedy token ids (asserted); the script prints tokens/s of each and the ratio (target >= 5x at
batch 32), plus the batched path with top-k capture on, to show what the extra forward pass costs.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.config import GenerateConfig, TeacherConfig
from distill.data.prompts import Record
from distill.teachers.base import Prompt
from distill.teachers.hf import HFTeacher

CORPUS = ["Q: Tom has 12 apples. He eats 5. How many apples now? A: 12 - 5 = 7. The answer is 7.",
          "Distillation trains a small student to imitate a large teacher.",
          "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , ."] * 10


def build(vocab: int = 512, hidden: int = 128, layers: int = 4):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), tokenizer


def prompts(n: int) -> list[str]:
    return [f"Q: Tom has {i} apples. He eats {i % 9}. " + "How many apples now? " * (1 + i % 4) + "A:" for i in range(n)]


@torch.inference_mode()
def one_at_a_time(model, tokenizer, texts: list[str], max_new: int, eos: int) -> list[list[int]]:
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = gen[0, ids["input_ids"].shape[1]:].tolist()
        out.append(new[: new.index(eos) + 1] if eos in new else new)
    return out


def batched(teacher: HFTeacher, texts: list[str], params: GenerateConfig) -> list[list[int]]:
    items = [Prompt(i, Record(prompt=t), t) for i, t in enumerate(texts)]
    done = {p.index: c.token_ids for p, c in teacher.generate(items, params)}
    return [done[i] for i in range(len(texts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()

    model, tokenizer = build()
    teacher = HFTeacher(TeacherConfig(model="random-tiny-llama"), model=model, tokenizer=tokenizer)
    texts = prompts(args.prompts)
    params = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    batched(teacher, texts[: args.batch_size], params)  # warm-up

    t0 = time.perf_counter()
    single = one_at_a_time(model, tokenizer, texts, args.max_new_tokens, tokenizer.eos_token_id)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = batched(teacher, texts, params)
    t_batched = time.perf_counter() - t0
    assert fast == single, "batched greedy output differs from one-at-a-time generation"
    t0 = time.perf_counter()
    with_topk = batched(teacher, texts, params.model_copy(update={"top_k": args.top_k}))
    t_topk = time.perf_counter() - t0
    assert with_topk == single

    tokens = sum(len(s) for s in single)
    rate_single, rate_batched, rate_topk = tokens / t_single, tokens / t_batched, tokens / t_topk
    print(f"model: random Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"threads={torch.get_num_threads()}; {len(texts)} prompts x {args.max_new_tokens} new tokens "
          f"({tokens} generated, greedy, outputs identical)")
    print(f"one at a time (model.generate):  {rate_single:8.1f} tokens/s  ({t_single:.2f}s)")
    print(f"batched (batch {args.batch_size}):            {rate_batched:8.1f} tokens/s  ({t_batched:.2f}s)")
    print(f"batched + top-{args.top_k} capture:       {rate_topk:8.1f} tokens/s  ({t_topk:.2f}s)")
    print(f"speed-up batched / one at a time: {rate_batched / rate_single:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
