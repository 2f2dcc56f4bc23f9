"""Train the math-tutor teacher from scratch: a small Llama that writes step-by-step solutions.

Run as:
    python scripts/train_math_teacher.py --out src/distill/recipes/math_tutor/teacher --minutes 60
    python scripts/train_math_teacher.py --out /tmp/teacher --minutes 5 --device cuda

Plain PyTorch + transformers, so anyone can rerun it. Training problems are drawn fresh from the task's
generator at every step (the train split is effectively unlimited, so there is no overfitting to manage);
the loss counts only the solution tokens and the final EOS. The learning rate warms up, then follows a
cosine over the *time* budget, so a run of any length ends annealed. A checkpoint (model, optimizer, clock)
is written every few minutes and `--resume` continues from it. At the end the model is scored by greedy
exact match on held-out problems and saved (safetensors + tokenizer + teacher_metrics.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from distill.modeling import count_parameters, save_model
from distill.recipes import math_tutor as task


def build_model(tokenizer, layers: int, hidden: int, heads: int, intermediate: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg)


def make_batch(tokenizer, problems: list[task.Problem]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+solution+EOS; labels are -100 on the prompt and the padding."""
    rows, labels = [], []
    for p in problems:
        prompt_ids = tokenizer(p.prompt)["input_ids"]  # starts with <s>
        sol_ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + sol_ids)
        labels.append([-100] * len(prompt_ids) + sol_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def lr_at(frac: float, step: int, base: float, warmup_steps: int, min_ratio: float = 0.05) -> float:
    """Linear warmup over steps, then cosine over the fraction of the time budget used."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return base * (min_ratio + (1 - min_ratio) * cos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (HF format)")
    ap.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=1000, help="held-out problems for the final score")
    ap.add_argument("--probe-every", type=float, default=5.0, help="minutes between quick held-out probes")
    ap.add_argument("--ckpt", default=None, help="checkpoint file (written periodically; use with --resume)")
    ap.add_argument("--ckpt-every", type=float, default=5.0, help="minutes between checkpoints")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", default=None, help="start from a saved teacher (HF dir) with a fresh schedule")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = task.build_tokenizer()
    if args.init:  # a second phase: same weights, new warmup + cosine (e.g. a lower --lr)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.init, use_safetensors=True, dtype=torch.float32).to(
            device
        )
        cfg = model.config
        args.layers, args.hidden = cfg.num_hidden_layers, cfg.hidden_size
        args.heads, args.intermediate = cfg.num_attention_heads, cfg.intermediate_size
    else:
        model = build_model(tok, args.layers, args.hidden, args.heads, args.intermediate, args.seed).to(
            device
        )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    step, used, tokens = 0, 0.0, 0
    if args.resume and args.ckpt and Path(args.ckpt).exists():
        state = torch.load(args.ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, used, tokens = state["step"], state["seconds"], state["tokens"]
        print(f"resumed from {args.ckpt}: step {step}, {used / 60:.1f} min used", flush=True)

    n_params = count_parameters(model)
    print(
        f"teacher: {n_params:,} params ({args.layers} layers, width {args.hidden}); "
        f"budget {args.minutes} min on {device} with {args.threads} thread(s)",
        flush=True,
    )
    probe = task.make_problems(200, seed=1, split="test")
    budget = args.minutes * 60
    start = time.time() - used
    last_ckpt = last_probe = time.time()
    ema = None
    model.train()
    while (elapsed := time.time() - start) < budget:
        lr = lr_at(elapsed / budget, step, args.lr, args.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        # fresh problems every step; seed by step so a resumed run continues the same stream
        seed = 10_000 + step + (1_000_000 if args.init else 0)  # a second phase sees new problems
        batch = make_batch(tok, task.make_problems(args.batch_size, seed=seed, split="train"))
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(batch["attention_mask"].sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(
                f"step {step} {elapsed / 60:.1f} min loss {ema:.4f} lr {lr:.2e} "
                f"{tokens / max(elapsed, 1e-9):.0f} tok/s",
                flush=True,
            )
        if time.time() - last_probe > args.probe_every * 60:
            model.eval()
            print(
                f"probe: held-out exact match {task.score(model, tok, probe):.3f} at step {step}", flush=True
            )
            model.train()
            last_probe = time.time()
        if args.ckpt and time.time() - last_ckpt > args.ckpt_every * 60:
            Path(args.ckpt).parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "seconds": time.time() - start,
                    "tokens": tokens,
                },
                args.ckpt,
            )
            last_ckpt = time.time()
    train_seconds = time.time() - start

    model.eval()
    t0 = time.time()
    held_out = task.make_problems(args.eval_n, seed=0, split="test")
    preds = task.greedy_solve(model, tok, [p.prompt for p in held_out])
    em = sum(task.exact_match(t, p.answer) for t, p in zip(preds, held_out)) / len(held_out)
    steps_ok = sum(task.check_solution(t, p) for t, p in zip(preds, held_out)) / len(held_out)
    eval_seconds = time.time() - t0
    print(
        f"held-out exact match {em:.4f} ({len(held_out)} problems), all steps right {steps_ok:.4f}, "
        f"eval {eval_seconds:.0f}s",
        flush=True,
    )

    out = Path(args.out)
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model.to("cpu"), tok, out)
    metrics = {
        "params": n_params,
        "weights_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "architecture": {
            "layers": args.layers,
            "hidden": args.hidden,
            "heads": args.heads,
            "intermediate": args.intermediate,
            "vocab": len(tok),
        },
        "held_out_exact_match": round(em, 4),
        "held_out_steps_correct": round(steps_ok, 4),
        "held_out_problems": len(held_out),
        "held_out_seed": 0,
        "train_seconds": round(train_seconds, 1),
        "train_steps": step,
        "init_from": args.init,  # a second phase: its steps and seconds add to the first's
        "train_tokens": tokens,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "device": str(device),
        "threads": args.threads,
        "task": task.task_settings(),
    }
    (out / "teacher_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2), flush=True)


if __name__ == "__main__":
    main()
