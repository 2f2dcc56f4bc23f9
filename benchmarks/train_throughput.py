"""Training throughput: distill's DistillationTrainer vs a hand-written PyTorch KD loop vs TRL's GKDTrainer.

Run as:  PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/train_throughput.py [--vocab 512 8192 --steps 25
         --repeats 3]  (PYTHONPATH: this checkout's distill, not an installed one)
         (needs TRL, from `pip install -e ".[test]"`; about 3-4 minutes on 2 busy cores; `--breakdown` adds the
         hand loop with distill's loss function; `--loss-memory` adds plain vs chunked loss peak memory)

The three variants train the same tiny random Llama student (2 layers, width 64) against the same frozen random
Llama teacher (4 layers, width 128) on the same batches in the same order (sequential sampling), with the same
objective: generalised JSD, beta = 0.5, temperature 1 (TRL's GKDTrainer always computes its loss at T = 1), on
completion tokens only, lmbda = 0 (no on-policy generation), fused AdamW (the Trainer's default) with the same
learning rate, linear decay and gradient clipping at 1.0. TRL reads chat `messages` through its own collator;
distill and the hand loop get the pre-tokenized prompt + response; the script asserts that TRL's collator gives
exactly the same token ids and labels. Every example has the same length, so there is no padding (TRL pads on
the left, distill on the right, which would shift rotary positions and make the losses differ). Two model
vocabularies by default: 512 (the tokenizer's size, where the models dominate) and 8192 (unused extra rows, as
models that pad their vocabulary have; the loss's share of a step then resembles a real LLM's).

Each variant runs in a fresh subprocess (peak RSS is its own) pinned to one thread; rounds are interleaved; the
table shows the best round of each, the distill/TRL and distill/hand ratios are the median over rounds of the
ratio within a round, with their spread. Throughput is per CPU-second of that one-thread process from the end of the
`--warmup` steps to the end of the last step (imports, model building, Trainer set-up excluded): on a shared
machine the wall clock mostly measures waiting for a core (printed too). Tokens/s counts *completion tokens*
(the tokens the loss is computed on); all tokens/s is printed too. Equal loss: the mean training loss of the last
10 steps and the trained student's loss on 4 held-out batches (one function for all three). The last line per
vocabulary times the loss function alone (forward + backward at the benchmark's shapes) for each variant.

distill's trainer runs with its defaults, so with the fused linear loss (distill.losses.fused): the models skip
lm_head and only the completion tokens are projected (the hand loop projects every position). The "loss alone" line still times distill's loss on full logits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("distill", "hand", "trl")
# --breakdown: the hand loop calling distill.losses.jsd, to split distill's gap to the hand loop into the loss
# function and the rest (Trainer loop, compute_loss).
BREAKDOWN = "hand_distill_loss"
# A chat template whose assistant turn starts after a newline, so the prompt/response boundary is also a token
# boundary: tokenizing the prompt and the response separately (distill) gives the same ids as tokenizing the
# whole conversation (TRL's DataCollatorForChatML).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}:\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:\n{% endif %}"
)
NAMES = ["Lily", "Tom", "Ana", "Ben", "Maya", "Sam", "Zoe", "Omar"]
ITEMS = ["apples", "cards", "books", "coins", "pens", "shells"]


# ------------------------------------------------------------------------------------------------ the data


def _conversation(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    prompt = f"Q: {name} has {a} {item}. {name} finds {b} more {item}. How many {item} does {name} have now?"
    response = f"A: {name} had {a} {item} and found {b}, so {a} + {b} = {a + b}. The answer is {a + b}."
    return prompt, response


def build_data(workdir: Path, n_train: int, n_eval: int, vocab: int = 512, seed: int = 0) -> dict:
    """Tokenizer (saved to workdir) and equal-length examples: each conversation as messages and as token ids."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tokenizer

    from distill.data.batching import tokenize_pair

    tokenizer = make_tokenizer(vocab_size=vocab)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(workdir / "tokenizer")
    rng = random.Random(seed)
    by_length: dict[int, list[dict]] = {}
    for _ in range(40 * (n_train + n_eval)):
        prompt, response = _conversation(rng)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        prompt_text = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        ex = tokenize_pair(tokenizer, prompt_text, response, max_length=4096)
        by_length.setdefault(len(ex["input_ids"]), []).append({"messages": messages, **ex})
    length, pool = max(by_length.items(), key=lambda kv: len(kv[1]))
    if len(pool) < n_train + n_eval:
        raise SystemExit(
            f"only {len(pool)} examples of length {length}; ask for fewer steps or a smaller batch"
        )
    return {"length": length, "train": pool[:n_train], "eval": pool[n_train : n_train + n_eval]}


def check_same_batches(data: dict, workdir: Path) -> None:
    """TRL's collator must produce exactly the ids and labels distill's examples hold (no padding anywhere)."""
    from transformers import AutoTokenizer
    from trl.experimental.utils import DataCollatorForChatML

    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    collate = DataCollatorForChatML(tokenizer=tokenizer, max_length=4096)
    for ex in data["train"] + data["eval"]:
        batch = collate([{"messages": ex["messages"]}])
        if batch["input_ids"][0].tolist() != ex["input_ids"] or batch["labels"][0].tolist() != ex["labels"]:
            raise SystemExit(f"TRL and distill tokenize differently: {ex['messages']}")


# ------------------------------------------------------------------------------------------ the child process


def _models(vocab: int):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_llama

    # A wider init makes the random teacher's next-token distributions peaked (top-1 ~0.2 instead of ~uniform),
    # so the divergence is far from 0 and training visibly lowers it.
    teacher = make_llama(vocab, hidden=128, layers=4, seed=1, initializer_range=0.2)
    student = make_llama(vocab, hidden=64, layers=2, seed=0)
    return teacher, student


def jsd_loss(student_logits, teacher_logits, labels, beta: float):
    """Generalised JSD (TRL's convention) over completion tokens: the hand loop's loss, and the held-out metric."""
    import math

    import torch
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    ls = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
    lt = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    kl_t = F.kl_div(lm, lt, reduction="sum", log_target=True)  # KL(teacher || mixture)
    kl_s = F.kl_div(lm, ls, reduction="sum", log_target=True)  # KL(student || mixture)
    return (beta * kl_t + (1 - beta) * kl_s) / mask.sum()


def _eval_loss(student, teacher, batches, beta: float) -> float:
    import torch

    student.eval()
    with torch.no_grad():
        values = [
            float(jsd_loss(student(input_ids=b["input_ids"]).logits, teacher(input_ids=b["input_ids"]).logits,
                           b["labels"], beta))
            for b in batches
        ]  # fmt: skip
    return sum(values) / len(values)


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, which starts afresh at exec. ru_maxrss would not do: Linux carries
    the pre-exec high-water mark over, so a child would report at least the parent's RSS at spawn time."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: ru_maxrss (kB on Linux)


class _Clock:
    """CPU and wall time between the end of optimiser step `start_step` and the end of step `stop_step`.

    CPU time of the (one-thread) process is the primary figure: on a shared machine the wall clock mostly
    measures how long the process waited for a core.
    """

    def __init__(self, start_step: int, stop_step: int):
        self.start_step, self.stop_step = start_step, stop_step
        self.cpu0 = self.cpu1 = self.t0 = self.t1 = None
        self.rss0 = None

    def step_done(self, step: int) -> None:
        if step == self.start_step:
            self.cpu0, self.t0 = time.process_time(), time.perf_counter()
            self.rss0 = _peak_rss_mb()
        if step == self.stop_step:
            self.cpu1, self.t1 = time.process_time(), time.perf_counter()


def _training_args(cls, out: str, args: argparse.Namespace, **extra):
    return cls(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=10, save_strategy="no", report_to="none", seed=0, remove_unused_columns=False,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
        bf16=False, **extra,
    )  # fmt: skip


def _trainer_callback(clock: _Clock, losses: list[float]):
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Hooks()


def run_distill(args, data, tokenizer, teacher, student, clock, losses) -> None:
    from transformers import TrainingArguments

    from distill.data.batching import DistillCollator
    from distill.training.trainer import DistillationTrainer, LossSpec

    examples = [{k: ex[k] for k in ("input_ids", "labels", "prompt_len")} for ex in data["train"]]
    with tempfile.TemporaryDirectory() as out:
        trainer = DistillationTrainer(
            model=student, args=_training_args(TrainingArguments, out, args), train_dataset=examples,
            data_collator=DistillCollator(pad_token_id=tokenizer.pad_token_id), processing_class=tokenizer,
            teacher=teacher, losses=[LossSpec("jsd", temperature=1.0, params={"beta": args.beta})],
            callbacks=[_trainer_callback(clock, losses)],
        )  # fmt: skip
        trainer.train()


def run_trl(args, data, tokenizer, teacher, student, clock, losses) -> None:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dataset = Dataset.from_list([{"messages": ex["messages"]} for ex in data["train"]])
    with tempfile.TemporaryDirectory() as out:
        # TRL's own defaults (bf16, gradient checkpointing) turned off to match the other two
        config = _training_args(GKDConfig, out, args, lmbda=0.0, beta=args.beta, temperature=1.0,
                                max_length=4096, max_new_tokens=16, gradient_checkpointing=False)  # fmt: skip
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[_trainer_callback(clock, losses)],
        )  # fmt: skip
        trainer.train()


def _distill_jsd(student_logits, teacher_logits, labels, beta: float):
    from distill.losses import LOSSES

    mask = labels[:, 1:] != -100
    return LOSSES["jsd"](student_logits[:, :-1], teacher_logits[:, :-1], mask, beta=beta)


def run_hand(args, data, tokenizer, teacher, student, clock, losses, loss_fn=jsd_loss) -> None:
    """The reference: what one writes by hand, with the Trainer's optimiser, schedule and clipping."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from distill.data.batching import DistillCollator

    torch.manual_seed(0)
    collate = DistillCollator(pad_token_id=tokenizer.pad_token_id)
    total = args.warmup + args.steps
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, total)
    step_losses = []
    train = data["train"]
    for step in range(1, total + 1):
        batch = collate(train[(step - 1) * args.batch_size : step * args.batch_size])
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits  # fmt: skip
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits  # fmt: skip
        loss = loss_fn(s_logits, t_logits, batch["labels"], args.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
        if step % 10 == 0:
            losses.append(sum(step_losses[-10:]) / 10)
        clock.step_done(step)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from distill.data.batching import DistillCollator

    data = json.loads(Path(args.data).read_text())
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data).parent / "tokenizer")
    teacher, student = _models(args.vocab)
    collate = DistillCollator(pad_token_id=tokenizer.pad_token_id)
    eval_batches = [
        collate(data["eval"][i : i + args.batch_size]) for i in range(0, len(data["eval"]), args.batch_size)
    ]
    initial = _eval_loss(student, teacher, eval_batches, args.beta)
    clock, losses = _Clock(args.warmup, args.warmup + args.steps), []
    run = {"distill": run_distill, "hand": run_hand, "trl": run_trl,
           BREAKDOWN: lambda *a: run_hand(*a, loss_fn=_distill_jsd)}[args.child]  # fmt: skip
    run(args, data, tokenizer, teacher, student, clock, losses)
    if clock.t0 is None or clock.t1 is None:
        raise SystemExit(f"{args.child}: the step clock never started/stopped")
    cpu, wall = clock.cpu1 - clock.cpu0, clock.t1 - clock.t0
    peak = _peak_rss_mb()
    completion = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in data["train"][: args.batch_size])
    print(json.dumps({
        "steps": args.steps,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "completion_tokens_per_s": completion * args.steps / cpu,
        "tokens_per_s": data["length"] * args.batch_size * args.steps / cpu,
        "wall_completion_tokens_per_s": completion * args.steps / wall,
        "peak_rss_mb": peak,
        "rss_growth_mb": peak - clock.rss0,
        "train_loss": losses[-1],
        "eval_loss": _eval_loss(student, teacher, eval_batches, args.beta),
        "initial_eval_loss": initial,
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the parent


def _run_child(variant: str, vocab: int, args: argparse.Namespace, data_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--data", str(data_path), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--beta", str(args.beta), "--vocab", str(vocab)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}  # fmt: skip
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{variant} (vocab {vocab}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loss_only(vocab: int, batch: int, length: int, completion: int, beta: float, repeats: int = 5) -> dict:
    """CPU ms of one step's loss forward + backward alone, at the benchmark's shapes: where distill's time goes."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    from distill.losses import LOSSES

    torch.manual_seed(0)
    student = torch.randn(batch, length, vocab, requires_grad=True)
    teacher = 3 * torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length - completion] = -100
    mask = labels[:, 1:] != -100
    n = mask.sum()
    fns = {
        "distill": lambda: LOSSES["jsd"](
            student[:, :-1], teacher[:, :-1], mask, beta=beta, num_items_in_batch=n
        ),
        "hand": lambda: jsd_loss(student, teacher, labels, beta),
        "trl": lambda: GKDTrainer.generalized_jsd_loss(
            student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=beta, num_items_in_batch=n
        ),
    }
    ms = {}
    for name, fn in fns.items():
        fn().backward()  # warm-up
        start = time.process_time()
        for _ in range(repeats):
            student.grad = None
            fn().backward()
        ms[name] = (time.process_time() - start) / repeats * 1e3
    return ms


def loss_memory(vocab: int = 49_152, tokens: int = 4_096, loss: str = "forward_kl") -> None:
    """benchmarks/loss_memory.py's plain vs chunked measurement, reused (each in its own subprocess)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import loss_memory as lm

    ns = argparse.Namespace(vocab=vocab, tokens=tokens, chunk_size=256, dtype="float32", loss=loss)
    plain, chunked = lm._run("plain", ns), lm._run("chunked", ns)
    print(f"\nLoss peak memory, {loss} forward+backward, {tokens} tokens x vocab {vocab} (fp32):")
    for name, r in (("plain", plain), ("chunked", chunked)):
        print(
            f"  {name:8s} peak RSS growth {r['peak_growth_mb']:7.0f} MB  {r['seconds']:6.1f} s  loss {r['loss']:.6f}"
        )
    print(f"  chunked / plain: {chunked['peak_growth_mb'] / plain['peak_growth_mb']:.1%} (target <= 30%)")


def _report(vocab: int, results: dict[str, list[dict]], loss_ms: dict[str, float]) -> None:
    best = {v: max(rs, key=lambda r: r["completion_tokens_per_s"]) for v, rs in results.items() if rs}
    print(f"\nmodel vocab {vocab}: best of {len(results['distill'])} round(s); tok/s per CPU-second of the one-thread "
          "process (wall-clock figure in brackets)")  # fmt: skip
    print(
        "variant           completion tok/s  (wall)    all tok/s  peak RSS MB  RSS growth MB  train loss  held-out loss"
    )
    for v, b in best.items():
        print(f"{v:17s} {b['completion_tokens_per_s']:16.0f} ({b['wall_completion_tokens_per_s']:6.0f}) "
              f"{b['tokens_per_s']:10.0f} {b['peak_rss_mb']:12.0f} {b['rss_growth_mb']:14.1f} "
              f"{b['train_loss']:11.5f} {b['eval_loss']:14.5f}")  # fmt: skip
    spread = max(b["eval_loss"] for b in best.values()) - min(b["eval_loss"] for b in best.values())
    print(f"held-out loss before training {best['distill']['initial_eval_loss']:.5f}; spread across variants "
          f"after training {spread:.1e}")  # fmt: skip
    # per round (the variants of a round ran back to back): median ratio and its spread, not best against best
    for other, target in (("trl", 1.3), ("hand", 1.0)):
        ratios = sorted(d["completion_tokens_per_s"] / o["completion_tokens_per_s"]
                        for d, o in zip(results["distill"], results[other]))  # fmt: skip
        name = "distill / TRL:" if other == "trl" else "distill / hand loop:"
        print(f"{name:20s} {statistics.median(ratios):.2f}x median of {len(ratios)} rounds "
              f"({ratios[0]:.2f}-{ratios[-1]:.2f}) (target >= {target}x)")  # fmt: skip
    if BREAKDOWN in best:
        step_ms = {v: 1e3 * b["cpu_seconds"] / b["steps"] for v, b in best.items()}
        print(f"CPU ms per step: distill {step_ms['distill']:.1f} = hand loop {step_ms['hand']:.1f} "
              f"+ distill's loss function {step_ms[BREAKDOWN] - step_ms['hand']:+.1f} "
              f"+ Trainer loop and compute_loss {step_ms['distill'] - step_ms[BREAKDOWN]:+.1f}")  # fmt: skip
    print("loss alone, forward + backward per step (CPU ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in loss_ms.items()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=25, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[512, 8192],
        help="model vocabularies to run (the tokenizer has 431 tokens; rows beyond are unused "
        "ids, as in models that pad their vocabulary); 8192 makes the loss's share realistic",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three variants (best is kept)")
    parser.add_argument(
        "--loss-memory",
        action="store_true",
        help="also run loss_memory.py at vocab 49,152 x 4,096 tokens (minutes, ~8 GB)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help=f"also run {BREAKDOWN}: the hand loop with distill's loss function",
    )
    parser.add_argument("--child", choices=(*VARIANTS, BREAKDOWN), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.vocab = args.vocab[0]
        child(args)
        return
    if (args.warmup + args.steps) % 10:
        parser.error("--warmup + --steps must be a multiple of 10 (the Trainer logs the loss every 10 steps)")

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    load = os.getloadavg()
    print(f"Machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min). "
          "Each variant runs in its own process pinned to 1 thread and is timed in CPU seconds; under load the "
          "wall clock mostly measures waiting for a core.")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        n_train = (args.warmup + args.steps) * args.batch_size
        data = build_data(workdir, n_train, 4 * args.batch_size)
        check_same_batches(data, workdir)
        data_path = workdir / "data.json"
        data_path.write_text(json.dumps(data))
        length = data["length"]
        completion = sum(x != -100 for x in data["train"][0]["labels"][1:])
        print(f"Teacher: Llama 4 layers x 128, student: 2 layers x 64; batch {args.batch_size} x {length} tokens "
              f"({completion} completion tokens per sequence, no padding; TRL's collator checked to give the same "
              f"ids and labels); {args.warmup} warm-up + {args.steps} timed steps; generalised JSD beta={args.beta}, "
              f"T=1, lr {args.lr}")  # fmt: skip
        for vocab in args.vocab:
            results: dict[str, list[dict]] = {v: [] for v in (*VARIANTS, BREAKDOWN)}
            for r in range(args.repeats):
                for variant in (*VARIANTS, BREAKDOWN) if args.breakdown else VARIANTS:
                    res = _run_child(variant, vocab, args, data_path)
                    results[variant].append(res)
                    print(f"  vocab {vocab} round {r + 1} {variant:8s} {res['completion_tokens_per_s']:6.0f} "
                          f"completion tok/s ({res['cpu_seconds']:.2f} CPU-s, {res['wall_seconds']:.2f} s wall)",
                          flush=True)  # fmt: skip
            _report(vocab, results, loss_only(vocab, args.batch_size, length, completion, args.beta))
    if args.loss_memory:
        loss_memory()
    else:
        print(
            "\nLoss peak memory (plain vs chunked, vocab 49,152 x 4,096 tokens): add --loss-memory, or run\n"
            "  OMP_NUM_THREADS=1 python benchmarks/loss_memory.py --vocab 49152 --tokens 4096  (minutes, ~8 GB)"
        )


if __name__ == "__main__":
    main()
