"""`distill eval`: teacher and every student on the same held-out prompts: task score, fidelity, cost.

Run as: `distill eval cfg.yaml eval.limit=200` (writes run_dir/eval/results.json and outputs.jsonl).

Per model: the task score (`eval.metric`), overall and per group of `eval.group_field` (the error breakdown),
the % of the teacher's score a student keeps, answer agreement (the student's extracted answer equals the
teacher's), token agreement and KL(teacher || student) under teacher forcing on the teacher's greedy outputs
(same tokenizer only), and cost: parameters, bytes on disk, latency p50/p95 at batch 1 (over several passes,
with their spread), tokens/s at `eval.batch_size`, peak memory and $ per million generated tokens. Timed
generations always produce exactly `eval.latency_new_tokens` tokens, so models that stop early are not
flattered. Samples carry every model's per-prompt score (the report's right/wrong marks), and
`disagreements` lists, per student, prompts where its answer is not the teacher's.

Peak memory: on CUDA, the allocator's peak (`torch.cuda.max_memory_allocated`) during the throughput batch
minus what was allocated before the model was loaded (weights + activations + KV cache); on CPU, the peak
RSS increase of loading the model and generating that batch in a separate process (see
distill.evaluation.peak_memory for why and how). Cost measurements live in distill.evaluation.cost.

Teachers: hf and vllm backends are loaded locally with transformers; an openai-backend teacher is scored
from its greedy replies over the API (request latency and tokens/s only; no fidelity, see api_teacher_entry).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from distill.config import Config, ConfigError, load_config
from distill.data.cot import student_prompt
from distill.data.prompts import load_records, render_prompt
from distill.errors import DataError
from distill.evaluation.api_teacher import NO_API_FIDELITY, api_teacher_entry
from distill.evaluation.cost import measure_cost, relative_to_teacher, throughput_batch
from distill.evaluation.fidelity import fidelity
from distill.evaluation.generation import generate_batch, is_adapter, load_for_eval, vocabulary_mismatch
from distill.evaluation.metrics import (
    answer_agreement,
    get_metric,
    group_scores,
    prompt_scores,
    score_outputs,
)
from distill.evaluation.peak_memory import measure_cpu
from distill.evaluation.stats import speed_claim
from distill.evaluation.verdict import provenance, verdict
from distill.teachers.registry import backend_spec


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


def disagreements(student: list[str], teacher: list[str], answer_regex: str | None) -> list[int]:
    """Indices of the prompts where the student's final answer differs from the teacher's."""
    return [
        i for i, (s, t) in enumerate(zip(student, teacher))
        if answer_agreement([s], [t], answer_regex) == 0
    ]


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _add_verdict(cfg: Config, results: dict[str, Any], marks: dict[str, list[float | None]], teacher_texts: list[str],
                 outputs: dict[str, list[str]], references: list[str | None], metric) -> None:
    """results['verdict'] (intervals, paired test, precision, collapse, teacher check, speed claim per student)
    and results['provenance'] (teacher, data, seeds, generation cost)."""
    results["verdict"] = verdict(cfg, marks, teacher_texts, outputs, references, metric)
    t = results["teacher"]
    for name, entry in results["students"].items():
        results["verdict"]["students"][name]["speed"] = speed_claim(
            t.get("latency_pass_p50_ms"), entry.get("latency_pass_p50_ms"), entry.get("speedup")
        )
    results["provenance"] = provenance(cfg)


def _warn_verdict(console, results: dict[str, Any]) -> None:
    """The verdict's alarms on the console too: a teacher that cannot do the task, a collapsed student."""
    v = results["verdict"]
    if v["teacher"]["flagged"]:
        console.print(f"[bold red]warning:[/] {v['teacher']['reason']}", highlight=False, soft_wrap=True)
    for name, s in v["students"].items():
        for reason in s["collapse"]["reasons"]:
            console.print(f"[bold red]warning:[/] student {name} collapsed: {reason}", highlight=False, soft_wrap=True)


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
    try:
        metric = get_metric(ev.metric, ev.answer_regex)  # fail on a bad metric before loading any model
    except ValueError as exc:  # its messages name eval.metric / eval.answer_regex: a user error
        raise ConfigError(str(exc)) from exc
    records = load_records(_eval_input(cfg), cfg.data, limit=ev.limit)
    # a conversational row's last assistant turn (or TRL's `completion`) is the reference when none is given
    references = [r.reference if r.reference is not None else r.response for r in records]
    if all(ref is None for ref in references) and getattr(metric, "needs_reference", True):
        fields = sorted({k for r in records for k in r.extra}) or ["none besides the prompt"]
        raise DataError(
            f"{_eval_input(cfg)}: no row has the reference field '{cfg.data.reference_field}' "
            f"(data.reference_field), which eval.metric={ev.metric} needs; other fields: {', '.join(fields)}. "
            "Set data.reference_field, or use a metric whose function has `needs_reference = False`"
        )
    students = student_dirs(cfg)
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
        marks[name] = prompt_scores(metric, gen.texts, references)
        entry: dict[str, Any] = {
            "path": str(path),
            "score": score,
            "n_scored": n_scored,
            "groups": group_scores(marks[name], groups),
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
    marks: dict[str, list[float | None]] = {}  # per-prompt metric of every model, for marks and the breakdown
    groups = [r.extra.get(ev.group_field) if ev.group_field else None for r in records]
    answer_regex = ev.answer_regex if ev.metric == "exact_match" else None

    if not backend_spec(cfg.teacher.backend).local_weights:  # scored over its endpoint
        console.print(f"[bold]eval[/] teacher: {cfg.teacher.model} over the API")
        teacher_entry, teacher_texts = api_teacher_entry(cfg, records, metric, references)
        marks["teacher"] = prompt_scores(metric, teacher_texts, references)
        teacher_entry["groups"] = group_scores(marks["teacher"], groups)
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
        entry["answer_agreement"] = answer_agreement(gen.texts, teacher_texts, answer_regex)
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
    def row(i: int) -> dict[str, Any]:
        r = records[i]
        return {
            "prompt": r.prompt_text(),
            "reference": references[i],
            "group": None if groups[i] is None else str(groups[i]),
            "teacher": teacher_texts[i],
            "students": {name: texts[i] for name, texts in outputs.items()},
            "scores": {name: values[i] for name, values in marks.items()},  # per model; None: no reference
        }

    results["group_field"] = ev.group_field if any(g is not None for g in groups) else None
    results["samples"] = [row(i) for i in range(min(ev.samples, len(records)))]
    found = {name: disagreements(texts, teacher_texts, answer_regex) for name, texts in outputs.items()}
    results["disagreements"] = {name: [row(i) for i in idx[: ev.samples]] for name, idx in found.items()}
    results["disagreement_counts"] = {name: len(idx) for name, idx in found.items()}  # all, not only those shown
    _add_verdict(cfg, results, marks, teacher_texts, outputs, references, metric)
    _warn_verdict(console, results)
    out_dir = Path(cfg.run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    with (out_dir / "outputs.jsonl").open("w") as fh:
        for i in range(len(records)):
            fh.write(json.dumps(row(i)) + "\n")
    console.print(f"[green]eval results:[/] {out_dir / 'results.json'}")
    return results
