"""Teacher vs student behind the same `distill serve` code under a concurrent OpenAI client.

Run as: `OMP_NUM_THREADS=1 python benchmarks/serve_latency.py [--requests 48] [--concurrency 8] [--max-tokens 32]`

Two tiny random Llamas (built here, nothing downloaded; the teacher is ~10x the student) are saved in HF
format and served one after the other on 127.0.0.1 by `distill.serving.serve.build_app` + uvicorn. A thread pool of
official `openai` clients sends the same greedy completion requests to each; the script prints requests/s,
generated tokens/s, p50/p95 latency and the student/teacher ratios, plus the mean number of rows the server
decoded per step (continuous batching: requests join a running batch between steps).
`--no-batching` adds the student with max_batch_size=1 to show what batching buys.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CORPUS = ["Q: Tom has 12 apples. He eats 5. How many apples now? A: 12 - 5 = 7. The answer is 7.",
          "Distillation trains a small student to imitate a large teacher.",
          "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? ! , ."] * 10
PROMPTS = [f"Q: Tom has {a} apples. He eats {b}. How many apples now? A:" for a in range(10, 40) for b in (3, 7)]


def build_tokenizer(vocab: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_llama(out: Path, tokenizer, hidden: int, layers: int, heads: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run_server(model_dir: Path, max_batch_size: int, batch_wait_ms: float):
    import uvicorn

    from distill.serving.serve import build_app

    app = build_app(model_dir, served_model_name="m", max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                    device="cpu", dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, app, f"http://127.0.0.1:{port}/v1"


def measure(model_dir: Path, args, max_batch_size: int) -> dict:
    import openai

    server, thread, app, url = run_server(model_dir, max_batch_size, args.batch_wait_ms)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    def one(prompt: str):
        t0 = time.perf_counter()
        r = client.completions.create(model="m", prompt=prompt, max_tokens=args.max_tokens, temperature=0)
        return time.perf_counter() - t0, r.usage.completion_tokens

    try:
        one(PROMPTS[0])  # warm-up (first forward pays one-off costs)
        engine = app.state.engine
        s0, r0 = engine.stats.steps, engine.stats.step_rows
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, prompts))
        wall = time.perf_counter() - t0
        steps, step_rows = engine.stats.steps - s0, engine.stats.step_rows - r0
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    lat = sorted(x for x, _ in results)
    tokens = sum(t for _, t in results)
    return {"requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "decode_steps": steps, "mean_rows_per_step": step_rows / max(steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long the batcher waits for more rows")
    ap.add_argument("--no-batching", action="store_true", help="also run the student with max_batch_size=1")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()

    tok = build_tokenizer()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"teacher": (512, 8, 8), "student": (128, 2, 4)}
        params = {name: save_llama(Path(tmp) / name, tok, *shape) for name, shape in sizes.items()}
        for name in ("teacher", "student"):
            rows[name] = {"parameters": params[name], **measure(Path(tmp) / name, args, args.max_batch_size)}
        if args.no_batching:
            rows["student (batch 1)"] = {"parameters": params["student"], **measure(Path(tmp) / "student", args, 1)}

    print(f"\n{args.requests} greedy completions, max_tokens={args.max_tokens}, {args.concurrency} concurrent clients, "
          f"max_batch_size={args.max_batch_size}, batch_wait_ms={args.batch_wait_ms:g}, torch threads={torch.get_num_threads()}")
    print(f"{'model':<18} {'params':>10} {'req/s':>8} {'tok/s':>9} {'p50 s':>8} {'p95 s':>8} {'rows/step':>10}")
    for name, r in rows.items():
        print(f"{name:<18} {r['parameters']:>10,} {r['req_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['p50_s']:>8.3f} "
              f"{r['p95_s']:>8.3f} {r['mean_rows_per_step']:>10.1f}")
    t, s = rows["teacher"], rows["student"]
    ratios = {"params": t["parameters"] / s["parameters"], "req_per_s": s["req_per_s"] / t["req_per_s"],
              "p50": t["p50_s"] / s["p50_s"], "p95": t["p95_s"] / s["p95_s"]}
    print(f"student vs teacher: {ratios['params']:.1f}x fewer parameters, {ratios['req_per_s']:.2f}x requests/s, "
          f"p50 {ratios['p50']:.2f}x lower, p95 {ratios['p95']:.2f}x lower")
    if "student (batch 1)" in rows:
        b1 = rows["student (batch 1)"]
        print(f"batching (student): {s['req_per_s'] / b1['req_per_s']:.2f}x requests/s vs max_batch_size=1")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "args": vars(args) | {"json": str(args.json)}},
                                        indent=2))


if __name__ == "__main__":
    main()
