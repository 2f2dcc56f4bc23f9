"""Peak memory of offline training vs the size of the teacher store: it must not grow with the rows.

Run as:  OMP_NUM_THREADS=1 python benchmarks/store_memory.py [--rows 5000 50000 --steps 20 --workdir DIR]
         (about 2 GB of disk and 3-5 minutes on 2 cores; the stores are kept in --workdir for reruns)

Builds synthetic teacher stores with distill's own writer (`distill.store.shards.Store`): every row has a
16-token prompt and 256 response tokens with k = 20 top-k ids (int32) + logprobs (float16) + tail, the
columns `distill generate` writes. Then each store gets a fixed number of offline training steps (`distill
train` with train.signal=offline, a tiny random Llama student, batch 8) in a fresh process, whose peak RSS
(VmHWM from /proc/self/status) is printed. Before streaming, the whole store went into memory as Python
lists and per-example copies (about 100 KB per row here: 5 GB per process at 50,000 rows).

Last line: `store rows 50000/5000 peak RSS ratio: R` (target R <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT, RESPONSE, K = 16, 256, 20


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def build_teacher(workdir: Path) -> Path:
    """A tiny random Llama with the math-tutor tokenizer (offline training only reads its tokenizer/config)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = workdir / "teacher"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(REPO / "src/distill/recipes/math_tutor/tokenizer")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_store(path: Path, rows: int, vocab: int) -> None:
    import numpy as np

    from distill.store.shards import Store, store_stats

    if (path / "done").exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    rng = np.random.default_rng(rows)
    with Store(path, shard_rows=256, meta={"teacher": "synthetic", "params": {"top_k": K}}) as store:
        for i in range(rows):
            logits = rng.standard_normal((RESPONSE, K)).astype(np.float32) * 2
            logp = np.sort(logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.1, axis=-1)[:, ::-1]
            ids = rng.integers(3, vocab, size=(RESPONSE, K), dtype=np.int32)
            store.add({"key": f"{i:08d}", "index": i, "prompt": f"prompt {i}", "response": "",
                       "prompt_ids": [1, *rng.integers(3, vocab, PROMPT - 1).tolist()],
                       "response_ids": ids[:, 0].tolist(), "topk_ids": ids, "topk_logprobs": logp,
                       "tail": np.clip(1 - np.exp(logp).sum(-1), 0, None), "finish_reason": "length",
                       "teacher": "synthetic"})
    s = store_stats(path)
    print(f"built store of {s['rows']} rows ({s['bytes'] / 1e6:,.0f} MB on disk, {s['shards']} shards) "
          f"in {time.perf_counter() - start:.0f}s", flush=True)
    (path / "done").write_text("ok")


def child(store: Path, teacher: Path, steps: int, run_dir: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from distill.config import load_config
    from distill.training.train import train

    cfg = load_config({
        "run_dir": str(run_dir), "teacher": {"model": str(teacher)},
        "student": {"init": "config", "config": {"hidden_size": 32, "intermediate_size": 64,
                                                  "num_hidden_layers": 2, "num_attention_heads": 4,
                                                  "num_key_value_heads": 4}},
        "train": {"signal": "offline", "store": str(store), "max_steps": steps, "per_device_train_batch_size": 8,
                  "max_length": PROMPT + RESPONSE, "logging_steps": steps, "save_steps": 10 * steps,
                  "resume": False, "report_to": [], "args": {"disable_tqdm": True},
                  "losses": [{"name": "forward_kl"}]},
    })
    start = time.perf_counter()
    train(cfg)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb(), "seconds": time.perf_counter() - start}))


def run_child(store: Path, teacher: Path, steps: int, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix="run-"))
    cmd = [sys.executable, __file__, "--child", str(store), "--teacher", str(teacher), "--steps", str(steps),
           "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    shutil.rmtree(run_dir, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"training on {store} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs=2, default=[5000, 50000], help="small and large store sizes")
    ap.add_argument("--steps", type=int, default=20, help="offline training steps per store")
    ap.add_argument("--workdir", default=None, help="where stores are built (default: a temp dir, removed)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child), Path(args.teacher), args.steps, Path(args.run_dir))

    sys.path.insert(0, str(REPO / "src"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="distill-store-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        from transformers import AutoTokenizer

        teacher = build_teacher(workdir)
        vocab = len(AutoTokenizer.from_pretrained(teacher))
        results = {}
        for rows in args.rows:
            store = workdir / f"store-{rows}"
            build_store(store, rows, vocab)
            results[rows] = r = run_child(store, teacher, args.steps, workdir)
            print(f"store rows {rows}: peak RSS {r['peak_rss_mb']:,.0f} MB "
                  f"({args.steps} steps in {r['seconds']:.0f}s)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    small, large = args.rows
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    print(f"store rows {large}/{small} peak RSS ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
