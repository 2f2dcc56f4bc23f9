"""`distill eval`: teacher and every student on the same held-out prompts: task score, fidelity, cost.

Run as: `distill eval cfg.yaml eval.limit=200` (writes run_dir/eval/results.json and outputs.jsonl).

Per model: the task score (`eval.metric`), the % of the teacher's score a student keeps, token agreement and
KL(teacher || student) under teacher forcing on the teacher's greedy outputs (same tokenizer only), and cost:
parameters, bytes on disk, latency p50/p95 at batch 1, tokens/s at `eval.batch_size`, peak memory and $ per
million generated tokens. Timed generations always produce exactly `eval.latency_new_tokens` tokens, so
models that stop early are not flattered.

Peak memory: on CUDA, the allocator's peak (`torch.cuda.max_memory_allocated`) during the throughput batch
minus what was allocated before the model was loaded (weights + activations + KV cache); on CPU, the peak
RSS increase of loading the model and generating that batch in a separate process (see
distill.peak_memory for why and how). Cost measurements live in distill.cost.

Teachers: hf and vllm backends are loaded locally with transformers; an openai-backend teacher is scored
from its greedy replies over the API (request latency and tokens/s only; no fidelity, see api_teacher_entry).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.batching import left_pad
from distill.config import Config, ConfigError, load_config
from distill.cost import measure_cost, percentile, relative_to_teacher, throughput_batch
from distill.cot import student_prompt
from distill.data import load_records, render_prompt
from distill.metrics import get_metric, score_outputs, token_fidelity
from distill.peak_memory import measure_cpu

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------- loading


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_for_eval(
    path: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
):
    """(model, tokenizer) in eval mode; a LoRA adapter directory is loaded with peft and merged, so it is
    timed the way it would be served."""
    from distill.modeling import load_model, load_tokenizer, load_tokenizer_for, resolve_device, resolve_dtype

    if is_adapter(path):
        from peft import AutoPeftModelForCausalLM

        dev = resolve_device(device)
        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, str(dev)))
        model = model.merge_and_unload().to(dev)
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError):  # adapters often ship without a tokenizer: use the base model's
            tok = load_tokenizer(model.config._name_or_path)
    else:
        model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        tok = load_tokenizer_for(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, tok


def vocabulary_mismatch(student_tok, teacher_tok) -> str | None:
    """None when both tokenizers map the same tokens to the same ids (compared by vocabulary, not
    vocab_size); else the first line of the reason."""
    from distill.losses import VocabMismatchError, check_tokenizers

    try:
        check_tokenizers(student_tok, teacher_tok)
    except VocabMismatchError as exc:
        return str(exc).splitlines()[0].rstrip(":")
    return None


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    """Greedy outputs in prompt order: decoded text, prompt token ids and generated ids (cut after EOS)."""

    texts: list[str]
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]


def encode_prompts(tokenizer, prompts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]


def _generate_ids(model, tokenizer, batch: list[list[int]], max_new_tokens: int, fixed: bool):
    import torch
    from transformers import GenerationConfig

    # A fresh config: a checkpoint's sampling defaults (temperature, top_p) must not leak into greedy eval.
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if fixed else None,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    ids, mask = left_pad(batch, tokenizer.pad_token_id, model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return out[:, ids.shape[1] :].tolist()


def generate_batch(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    add_special_tokens: bool = True,
    label: str = "generating",
) -> Generation:
    """Batched greedy generation with left padding; prompts are sorted by length so batches pad little, and
    results come back in the original order."""
    from rich.progress import Progress

    prompt_ids = encode_prompts(tokenizer, prompts, add_special_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    eos = tokenizer.eos_token_id
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, new in zip(
                idx, _generate_ids(model, tokenizer, [prompt_ids[i] for i in idx], max_new_tokens, False)
            ):
                outputs[i] = new[: new.index(eos) + 1] if eos is not None and eos in new else new
            progress.advance(task, len(idx))
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    return Generation(texts=texts, prompt_ids=prompt_ids, output_ids=outputs)


# ---------------------------------------------------------------- fidelity


def _forward_last(model, ids: torch.Tensor, attn: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions of a left-padded batch; positions count from each row's first real
    token, as in generation. Only those positions are projected onto the vocabulary when the model supports
    `logits_to_keep` (prompt logits of a large vocabulary would dominate memory)."""
    import torch

    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    args = {
        "input_ids": ids.to(model.device),
        "attention_mask": attn.to(model.device),
        "position_ids": pos.to(model.device),
    }
    with torch.inference_mode():
        try:
            logits = model(**args, logits_to_keep=keep).logits
        except TypeError:  # models without logits_to_keep: project everything, then cut
            logits = model(**args).logits
    return logits[:, -keep:]


def fidelity(student, teacher, gen: Generation, pad_id: int, batch_size: int) -> dict[str, Any]:
    """Token agreement and mean KL(teacher || student) over the teacher's generated tokens, both models
    teacher-forced on prompt + teacher output (one forward pass each per batch)."""
    import torch

    rows = [(p, o) for p, o in zip(gen.prompt_ids, gen.output_ids) if o]
    agree = count = 0
    kl = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, attn = left_pad([p + o for p, o in chunk], pad_id, "cpu")
        longest = max(len(o) for _, o in chunk)
        # Sequences end together (left padding): the last `longest` tokens hold every response, predicted by
        # the logits one position earlier.
        counted = torch.zeros((len(chunk), longest), dtype=torch.bool)
        for i, (_, o) in enumerate(chunk):
            counted[i, longest - len(o) :] = True
        s_logits = _forward_last(student, ids, attn, longest + 1)[:, :-1]
        t_logits = _forward_last(teacher, ids, attn, longest + 1)[:, :-1]
        a, n, k = token_fidelity(s_logits.cpu(), t_logits.cpu(), ids[:, -longest:], counted)
        agree, count, kl = agree + a, count + n, kl + k
    if count == 0:
        return {
            "agreement": None,
            "kl": None,
            "fidelity_tokens": 0,
            "fidelity_note": "the teacher generated no tokens",
        }
    return {"agreement": agree / count, "kl": kl / count, "fidelity_tokens": count, "fidelity_note": None}


# ---------------------------------------------------------------- a teacher behind an API

NO_API_FIDELITY = {
    "agreement": None,
    "kl": None,
    "fidelity_tokens": 0,
    "fidelity_note": "the teacher is served over an API: no teacher logits to compare token by token",
}


def api_teacher_entry(
    cfg: Config, records: list, metric, references: list[str | None]
) -> tuple[dict[str, Any], list[str]]:
    """Score, request latency and throughput of a teacher behind an OpenAI-compatible endpoint (greedy).

    Latency is per HTTP request of up to eval.max_new_tokens tokens (an API cannot be made to produce a fixed
    count); tokens/s is over the whole eval set at teacher.max_concurrency requests in flight. Parameters,
    memory and $/M tokens are unknown for an API and stay null.
    """
    from distill.config import GenerateConfig
    from distill.teachers import Prompt, build_teacher, teacher_identity

    ev = cfg.eval
    params = GenerateConfig(max_new_tokens=ev.max_new_tokens, temperature=0.0, seed=cfg.seed)
    teacher = build_teacher(cfg)
    try:
        prompts = [Prompt(index=i, record=r, text=teacher.render(r)) for i, r in enumerate(records)]
        texts, tokens = [""] * len(prompts), 0
        start = time.perf_counter()
        for prompt, completion in teacher.generate(prompts, params):
            texts[prompt.index] = completion.text
            tokens += completion.num_tokens()
        wall = time.perf_counter() - start
        latency = []
        for i in range(ev.latency_requests):
            start = time.perf_counter()
            list(teacher.generate([prompts[i % len(prompts)]], params))
            latency.append(time.perf_counter() - start)
    finally:
        teacher.close()
    score, n_scored = score_outputs(metric, texts, references)
    entry = {
        "path": teacher_identity(cfg.teacher),
        "api": True,
        "score": score,
        "n_scored": n_scored,
        "mean_output_tokens": tokens / len(texts),
        "params": None,
        "bytes_on_disk": None,
        "adapter": False,
        "latency_ms_p50": 1000 * percentile(latency, 50),
        "latency_ms_p95": 1000 * percentile(latency, 95),
        "latency_new_tokens": None,
        "tokens_per_s": tokens / wall if tokens else None,
        "throughput_batch_size": cfg.teacher.max_concurrency,
        "peak_memory_bytes": None,
        "memory_method": "n/a: the teacher is served over an API",
        "cost_per_million_tokens": None,
    }
    return entry, texts


# ---------------------------------------------------------------- the stage


def student_dirs(cfg: Config) -> dict[str, Path]:
    """run_dir/students/NAME for every configured student; a missing one is a clear error."""
    out = {}
    for s in cfg.all_students():
        d = Path(cfg.run_dir) / "students" / s.name
        if not (d / "config.json").exists() and not is_adapter(d):
            raise FileNotFoundError(
                f"student '{s.name}': no model at {d} (train it first: `distill train CONFIG`)"
            )
        out[s.name] = d
    return out


def _eval_input(cfg: Config) -> Path | str:
    if cfg.eval.input is None:
        raise ConfigError(
            "eval.input: set the held-out prompts file (JSONL/JSON/CSV/Parquet with references)"
        )
    given = cfg.eval.input
    if given.startswith("hf:") or Path(given).exists():
        return given
    in_run = cfg.path(given)
    return in_run if in_run is not None and in_run.exists() else given


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(config: Config | str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate the teacher and every student of `config`; writes run_dir/eval/results.json and returns it."""
    import torch

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _evaluate(cfg)
    finally:
        torch.set_num_threads(threads)  # a library call must not leave the process's thread count changed


def _evaluate(cfg: Config) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from distill.modeling import resolve_device

    ev = cfg.eval
    console = Console(stderr=True)
    if not cfg.teacher.model:
        raise ConfigError("teacher.model: set the teacher to evaluate against")
    metric = get_metric(ev.metric, ev.answer_regex)  # fail on a bad metric before loading any model
    students = student_dirs(cfg)
    records = load_records(_eval_input(cfg), cfg.data, limit=ev.limit)
    references = [r.reference for r in records]
    device = str(resolve_device(ev.device))

    def run_model(name: str, path, trust: bool, teacher=None, cot=None):
        cuda_base = torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0
        console.print(f"[bold]eval[/] {name}: {path}")
        model, tok = load_for_eval(path, device, ev.dtype, trust)
        use_template = cfg.data.chat_template and bool(getattr(tok, "chat_template", None))
        prompts = [render_prompt(r, tok, cfg.data) for r in records]
        if cot is not None:  # a two-task chain-of-thought student is asked with its task prefix
            prompts = [student_prompt(p, cot) for p in prompts]
        gen = generate_batch(
            model,
            tok,
            prompts,
            ev.max_new_tokens,
            ev.batch_size,
            add_special_tokens=not use_template,
            label=f"{name}: generating",
        )
        score, n_scored = score_outputs(metric, gen.texts, references)
        entry: dict[str, Any] = {
            "path": str(path),
            "score": score,
            "n_scored": n_scored,
            "mean_output_tokens": sum(map(len, gen.output_ids)) / len(gen.output_ids),
        }
        if teacher is not None:
            t_model, t_tok, t_gen = teacher
            mismatch = vocabulary_mismatch(tok, t_tok)
            if mismatch is None:
                entry.update(fidelity(model, t_model, t_gen, t_tok.pad_token_id, ev.batch_size))
            else:
                entry.update(
                    {
                        "agreement": None,
                        "kl": None,
                        "fidelity_tokens": 0,
                        "fidelity_note": f"{mismatch}: token agreement and KL are undefined across "
                        "vocabularies",
                    }
                )
        entry.update(
            measure_cost(
                model, tok, gen.prompt_ids, cfg, path=path, trust_remote_code=trust, cuda_base=cuda_base
            )
        )
        if entry["memory_method"].startswith("pending"):
            probes[name] = {
                "path": str(path),
                "dtype": ev.dtype,
                "trust_remote_code": trust,
                "batch": throughput_batch(gen.prompt_ids, ev.batch_size),
                "new_tokens": ev.latency_new_tokens,
                "threads": cfg.train.threads,
            }
        return model, tok, gen, entry

    probes: dict[str, dict[str, Any]] = {}

    if cfg.teacher.backend == "openai":
        console.print(f"[bold]eval[/] teacher: {cfg.teacher.model} over the API")
        teacher_entry, teacher_texts = api_teacher_entry(cfg, records, metric, references)
        teacher = None
    else:
        t_model, t_tok, t_gen, teacher_entry = run_model(
            "teacher", cfg.teacher.model, cfg.teacher.trust_remote_code
        )
        teacher_texts, teacher = t_gen.texts, (t_model, t_tok, t_gen)
        del t_model
    results: dict[str, Any] = {
        "metric": ev.metric,
        "n_prompts": len(records),
        "n_with_reference": sum(r is not None for r in references),
        "eval_input": str(ev.input),
        "device": device,
        "dtype": ev.dtype,
        "cost_per_hour": ev.cost_per_hour,
        "teacher": teacher_entry,
        "students": {},
    }
    outputs = {}
    configs = {s.name: s for s in cfg.all_students()}
    for name, path in students.items():
        cot = cfg.train_for(configs[name]).cot
        model, _, gen, entry = run_model(name, path, False, teacher=teacher, cot=cot if cot.mode == "two_task" else None)
        if teacher is None:
            entry.update(NO_API_FIDELITY)
        results["students"][name] = entry
        outputs[name] = gen.texts
        del model
        _release_memory()
    teacher = None
    _release_memory()
    if probes:
        console.print(f"[bold]eval[/] peak memory of {len(probes)} models (separate process)")
        entries = {"teacher": teacher_entry, **results["students"]}
        for name, (peak, how) in zip(probes, measure_cpu(list(probes.values()), cfg.train.threads)):
            entries[name].update(peak_memory_bytes=peak, memory_method=how)
    for entry in results["students"].values():
        entry.update(relative_to_teacher(entry, teacher_entry))
    results["samples"] = [
        {
            "prompt": r.prompt_text(),
            "reference": r.reference,
            "teacher": teacher_texts[i],
            "students": {name: texts[i] for name, texts in outputs.items()},
        }
        for i, r in enumerate(records[: ev.samples])
    ]
    out_dir = Path(cfg.run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    with (out_dir / "outputs.jsonl").open("w") as fh:
        for i, r in enumerate(records):
            row = {
                "prompt": r.prompt_text(),
                "reference": r.reference,
                "teacher": teacher_texts[i],
                "students": {name: texts[i] for name, texts in outputs.items()},
            }
            fh.write(json.dumps(row) + "\n")
    console.print(f"[green]eval results:[/] {out_dir / 'results.json'}")
    return results
