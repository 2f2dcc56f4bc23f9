"""`distill report`: the evaluation side by side in report.md and a self-contained report.html, with plots,
and a model card (README.md) in every student's directory.

Run as: `distill report cfg.yaml` after `distill eval cfg.yaml` (reads run_dir/eval/results.json and each
student's train_log.json; writes run_dir/report/{report.md,report.html,*.png}).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import yaml

from distill.config import STUDENT_CONFIG_FILE, Config, load_config
from distill.reporting.failures import (
    breakdown_table,
    disagreement_answers,
    disagreement_heading,
    disagreements,
    labelled_answers,
)
from distill.reporting.plots import loss_series, make_plots
from distill.reporting.verdict import (
    collapse_lines,
    confidence_line,
    provenance_line,
    speed_cell,
    speed_text,
    teacher_line,
    verdict_lines,
    verdict_method_lines,
)

__all__ = ["COLUMNS", "loss_series", "make_plots", "report", "table_rows"]  # loss_series: moved to plots

COLUMNS = [  # (header, results key, formatter name)
    ("Score", "score", "score"),
    ("% of teacher", "percent_of_teacher", "pct"),
    ("Agreement", "agreement", "frac"),
    ("Answer agr.", "answer_agreement", "frac"),
    ("KL", "kl", "kl"),
    ("Params", "params", "count"),
    ("Size (MB)", "bytes_on_disk", "mb"),
    ("p50 (ms)", "latency_ms_p50", "ms"),
    ("p95 (ms)", "latency_ms_p95", "ms"),
    ("p50 spread", "latency_spread", "spread"),
    ("Tokens/s", "tokens_per_s", "int"),
    ("Memory (MB)", "peak_memory_bytes", "mb"),
    ("$/M tokens", "cost_per_million_tokens", "usd"),
    ("Speedup", "speedup", "x"),
    ("Smaller", "size_ratio", "x"),
]


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "count":
        for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if value >= div:
                return f"{value / div:.2f}{unit}"
        return str(value)
    formats = {
        "score": "{:.3f}",
        "pct": "{:.1f}%",
        "frac": "{:.3f}",
        "kl": "{:.4f}",
        "ms": "{:.1f}",
        "int": "{:,.0f}",
        "usd": "${:.4f}",
        "x": "{:.2f}x",
        "spread": "±{:.0%}",
    }
    if kind == "mb":
        return f"{value / 1e6:.2f}"
    return formats[kind].format(value)


def table_rows(results: dict) -> list[list[str]]:
    """One row per model (teacher first): name then every COLUMNS figure, formatted."""
    models = [("teacher", results["teacher"]), *results["students"].items()]
    rows = []
    for name, entry in models:
        row = [name]
        for _, key, kind in COLUMNS:
            cell = _fmt(entry.get(key), kind)
            if key == "latency_ms_p50" and entry.get("latency_noisy"):
                cell += " (noisy)"  # the passes disagreed or the tail is long: a busy machine, not the model
            if key == "speedup" and entry.get(key) and speed_cell(results, name) == "no measurable difference":
                cell += " (n.s.)"  # the passes straddle 1: a measurement, not a claim
            row.append(cell)
        rows.append(row)
    return rows


def load_train_log(path: Path) -> list[dict]:
    """The trainer's log_history entries; an absent log is an empty list (a student trained elsewhere)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of log entries (trainer_state.log_history)")  # noqa: TRY004
    return [e for e in data if isinstance(e, dict)]


# ---------------------------------------------------------------- training details


def training_details(run_dir: Path, name: str, cfg: Config) -> dict[str, Any]:
    """How a student was trained: its own resolved config (students/NAME/train_config.yaml), else the run's
    config.yaml with the student's train overrides (falling back to the given config), overridden by what its
    train_summary.json records."""
    own = run_dir / "students" / name / STUDENT_CONFIG_FILE
    saved = own if own.exists() else run_dir / "config.yaml"
    tree = yaml.safe_load(saved.read_text()) if saved.exists() else cfg.model_dump(mode="json")
    students = tree.get("students") or [tree.get("student") or {}]
    student = next((s for s in students if s.get("name", "student") == name), {})
    train = {**(tree.get("train") or {}), **(student.get("train") or {})}
    summary_path = run_dir / "students" / name / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    log = load_train_log(run_dir / "students" / name / "train_log.json")
    return {
        "init": summary.get("init", student.get("init")),
        "signal": summary.get("signal", train.get("signal")),
        "losses": summary.get("losses", train.get("losses") or []),
        "learning_rate": train.get("learning_rate"),
        "epochs": train.get("num_train_epochs"),
        "max_steps": train.get("max_steps"),
        "runtime_s": summary.get("train_runtime_s"),
        "summary": summary,
        "steps_done": summary.get("global_steps"),
        "epochs_done": summary.get("epochs"),
        "examples": summary.get("examples"),
        "tokens_seen": summary.get("tokens_seen"),
        "final_loss": _final_loss(log),
        "final_eval_loss": _final_loss(log, "eval_loss"),
    }


def _losses_text(losses: list) -> str:
    parts = []
    for term in losses:
        if isinstance(term, dict):
            extra = "".join(f", {k}={v}" for k, v in (term.get("params") or {}).items())
            parts.append(
                f"{term.get('name')} (weight {term.get('weight', 1.0)}, T={term.get('temperature', 1.0)}"
                f"{extra})"
            )
        else:
            parts.append(str(term))
    return "; ".join(parts) or "—"


def _training_text(d: dict[str, Any]) -> str:
    bits = [
        f"init `{d['init']}`" if d.get("init") else None,
        f"signal `{d['signal']}`" if d.get("signal") else None,
        f"losses {_losses_text(d['losses'])}",
        f"{d['runtime_s']:.0f} s" if d.get("runtime_s") is not None else None,
    ]
    return ", ".join(b for b in bits if b)


def _final_loss(log: list[dict], key: str = "loss") -> float | None:
    values = [e[key] for e in log if isinstance(e.get(key), (int, float))]
    return values[-1] if values else None


TRAINING_HEADER = ["Student", "Steps", "Epochs", "Examples", "Tokens seen", "Time (s)", "Final loss",
                   "Held-out loss"]


def training_rows(details: dict[str, dict]) -> list[list[str]]:
    """Per student: what it saw (steps, epochs, examples, tokens) and where its losses ended."""

    def num(value, spec):
        return "—" if value is None else format(value, spec)

    return [
        [name, num(d.get("steps_done"), ","), num(d.get("epochs_done"), ".2f"), num(d.get("examples"), ","),
         _fmt(d.get("tokens_seen"), "count"), num(d.get("runtime_s"), ".0f"), num(d.get("final_loss"), ".4f"),
         num(d.get("final_eval_loss"), ".4f")]
        for name, d in details.items()
    ]


# ---------------------------------------------------------------- markdown / html


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary_lines(results: dict) -> list[str]:
    t = results["teacher"]
    lines = []
    for name, s in results["students"].items():
        bits = [f"**{name}**:"]
        if s.get("percent_of_teacher") is not None:
            bits.append(f"keeps {s['percent_of_teacher']:.1f}% of the teacher's {results['metric']}")
        if s.get("size_ratio"):
            bits.append(f"{s['size_ratio']:.1f}x fewer parameters")
        if s.get("answer_agreement") is not None:
            token = f" (token agreement {s['agreement']:.3f})" if s.get("agreement") is not None else ""
            bits.append(f"gives the teacher's answer on {100 * s['answer_agreement']:.1f}% of prompts{token}")
        if s.get("speedup"):  # a ratio only when the timed passes agree on its side of 1 (never a noisy 0.82x)
            bits.append(speed_text(results, name))
        if s.get("cost_per_million_tokens") is not None and t.get("cost_per_million_tokens"):
            bits.append(
                f"${s['cost_per_million_tokens']:.4f} vs ${t['cost_per_million_tokens']:.4f} per M tokens"
            )
        lines.append(" ".join(bits[:1]) + " " + ", ".join(bits[1:]) + ".")
    return lines


def _method_lines(results: dict) -> list[str]:
    t = results["teacher"]
    local = next((e for e in [t, *results["students"].values()] if not e.get("api")), t)
    api = []
    if t.get("api"):
        api.append(
            f"The teacher ({t['path']}) is served over an API: its latency is per HTTP request of up to the "
            f"eval's max new tokens, its tokens/s over the eval set at {t['throughput_batch_size']} requests in "
            "flight; parameters, memory and $/M tokens are unknown for it."
        )
    return [
        (
            f"{results['n_prompts']} prompts from `{results['eval_input']}` ({results['n_with_reference']} with a "
            f"reference); metric `{results['metric']}`; device {results['device']}, dtype {results['dtype']}."
        ),
        (
            "Agreement: fraction of the teacher's greedy tokens that are also the student's argmax under teacher "
            "forcing; answer agreement: share of prompts where the student's extracted answer equals the "
            "teacher's; KL: mean KL(teacher || student) in nats per token on the teacher's tokens."
        ),
        (
            f"Latency: batch 1, {local['latency_new_tokens']} new tokens per request, "
            f"{len(local.get('latency_pass_p50_ms') or [0])} timed passes; p50 spread: (max - min) / median of "
            "the passes' p50s, '(noisy)' above 15% or when p95 > 3x p50; a speedup marked '(n.s.)' is not "
            "significant (the passes straddle 1); tokens/s at batch "
            f"{local['throughput_batch_size']}; $/M tokens at ${results['cost_per_hour']}/hour. "
            f"Memory: {local['memory_method']}."
        ),
        *api,
        *verdict_method_lines(results),
    ]


def _failure_sections(results: dict) -> list[tuple[str, str, list]]:
    """(kind, title, payload) blocks after the plots: the error breakdown, the disagreements, the samples."""
    blocks: list[tuple[str, str, list]] = []
    table = breakdown_table(results)
    if table is not None:
        field = results.get("group_field") or "group"
        blocks.append(("table", f"Score by {field}", [*table]))
    found = disagreements(results)
    if found:
        items = []
        totals = results.get("disagreement_counts") or {}
        for name, rows in found.items():
            if not rows:
                items.append((f"{name}: gives the teacher's answer on every prompt", []))
            for k, row in enumerate(rows, 1):
                items.append((disagreement_heading(name, k, len(rows), totals.get(name), results["n_prompts"]),
                              [("prompt", row["prompt"]), *disagreement_answers(row, name)]))
        blocks.append(("answers", "Where the students and the teacher disagree", items))
    samples = [
        (f"Sample {i}", [("prompt", s["prompt"]), *labelled_answers(s)])
        for i, s in enumerate(results.get("samples", []), 1)
    ]
    blocks.append(("answers", "Sample outputs", samples))
    return blocks


def render_markdown(results: dict, plots: dict[str, Path], details: dict[str, dict]) -> str:
    header = ["Model", *(c[0] for c in COLUMNS)]
    out = [
        "# Distillation report",
        "",
        "## Verdict",
        "",
        *(f"- {line}" for line in verdict_lines(results, details)),
        "",
        "## Summary",
        "",
        *(f"- {line}" for line in _summary_lines(results)),
        "",
        "## Teacher vs students",
        "",
        _md_table(header, table_rows(results)),
        "",
        *(f"- {line}" for line in _method_lines(results)),
        "",
    ]
    notes = [f"- {n}: {e['fidelity_note']}" for n, e in results["students"].items() if e.get("fidelity_note")]
    if notes:
        out += ["Notes:", *notes, ""]
    out += ["## Training", "", _md_table(TRAINING_HEADER, training_rows(details)), ""]
    out += [f"- **{name}**: {_training_text(d)}" for name, d in details.items()]
    out += ["", "## Plots", ""]
    out += [f"### {title}\n\n![{title}]({p.name})\n" for title, p in plots.items()]
    for kind, title, payload in _failure_sections(results):
        out += [f"## {title}", ""]
        if kind == "table":
            out += [_md_table(*payload), ""]
            continue
        for heading, answers in payload:
            out += [f"### {heading}", ""]
            for who, text in answers:
                out += [f"**{who}**", "", "```", text, "```", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}pre{background:#f6f6f6;padding:8px;
white-space:pre-wrap}img{max-width:100%}.sample{border-top:1px solid #ddd;margin-top:1em}
.ok{color:#1a7f37}.bad{color:#cf222e}code{background:#f3f3f3;padding:0 3px}"""


def _inline(text: str) -> str:
    """Escaped HTML of a markdown line: `code` and **bold** become tags instead of showing literal marks."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_label(label: str) -> str:
    css = " class='ok'" if "✓" in label else " class='bad'" if "✗" in label else ""
    return f"<p><b{css}>{html.escape(label)}</b></p>"


def render_html(results: dict, plots: dict[str, Path], details: dict[str, dict]) -> str:
    """One file with everything inline (styles and base64 PNGs): it can be mailed or attached as is."""
    e = html.escape
    head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Distillation report</title><style>{CSS}"
    head += "</style>"
    parts = [head + "</head><body><h1>Distillation report</h1><h2>Verdict</h2><ul>"]
    parts += [f"<li>{_inline(line)}</li>" for line in verdict_lines(results, details)]
    parts.append("</ul><h2>Summary</h2>")
    parts += [f"<p>{_inline(line)}</p>" for line in _summary_lines(results)]
    header = ["Model", *(c[0] for c in COLUMNS)]
    parts += [f"<h2>Teacher vs students</h2>{_html_table(header, table_rows(results))}<ul>"]
    parts += [f"<li>{_inline(line)}</li>" for line in _method_lines(results)]
    parts += [
        f"<li>{e(n)}: {_inline(x['fidelity_note'])}</li>"
        for n, x in results["students"].items()
        if x.get("fidelity_note")
    ]
    parts.append(f"</ul><h2>Training</h2>{_html_table(TRAINING_HEADER, training_rows(details))}<ul>")
    parts += [f"<li><b>{e(name)}</b>: {_inline(_training_text(d))}</li>" for name, d in details.items()]
    parts.append("</ul><h2>Plots</h2>")
    for title, p in plots.items():
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    for kind, title, payload in _failure_sections(results):
        parts.append(f"<h2>{e(title)}</h2>")
        if kind == "table":
            parts.append(_html_table(*payload))
            continue
        for heading, answers in payload:
            parts.append(f"<div class='sample'><p><b>{e(heading)}</b></p>")
            parts += [f"{_html_label(who)}<pre>{e(text)}</pre>" for who, text in answers]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- model card


def model_card(name: str, student_dir: Path, results: dict, details: dict, log: list[dict], cfg: Config | None = None):
    """README.md for a student directory (a huggingface_hub ModelCard, see distill.reporting.card): Hub
    metadata, what it is, how it was trained (facts from the trainer's state), its numbers next to the
    teacher's, and how to load and serve it."""
    from distill.reporting.card import dataset_ids, student_card

    s, t = results["students"][name], results["teacher"]
    rows = [[label, _fmt(t.get(key), kind), speed_cell(results, name) if key == "speedup" else _fmt(s.get(key), kind)]
            for label, key, kind in COLUMNS]  # a speedup only where the timed passes support it
    method = [
        f"- Student init: `{details['init'] or 'unknown'}`; teacher signal: `{details['signal'] or 'unknown'}`",
        f"- Losses: {_losses_text(details['losses'])}",
    ]
    final = _final_loss(log)
    if final is not None:
        method.append(f"- Final logged training loss: {final:.4f}")
    pct = s.get("percent_of_teacher")
    headline = (
        f"It keeps {pct:.1f}% of the teacher's `{results['metric']}` score"
        if pct is not None
        else f"Its `{results['metric']}` score is {_fmt(s.get('score'), 'score')}"
    )
    intro = (
        f"A student model distilled from the teacher `{t['path']}` with distill. {headline} with "
        f"{_fmt(s.get('params'), 'count')} parameters ({_fmt(s.get('size_ratio'), 'x')} fewer than the teacher's "
        f"{_fmt(t.get('params'), 'count')})."
    )
    teacher = teacher_line(results)
    warnings = [*([teacher] if teacher and teacher.startswith("⚠") else []), *collapse_lines(results, name)]
    intro = "\n\n".join([intro, *warnings])
    setup = "\n\n".join(x for x in (
        f"Metric `{results['metric']}`, device {results['device']}. {provenance_line(results)}",
        confidence_line(results, name),
    ) if x)
    inputs = [cfg.generate.input, cfg.train.input, cfg.eval.input] if cfg is not None else []
    return student_card(name, student_dir, results, intro=intro, method=method, setup=setup,
                        eval_table=_md_table(["", "teacher", name], rows),
                        datasets=dataset_ids([*inputs, results.get("eval_input")]))


# ---------------------------------------------------------------- the stage


def report(config: Config | str | Path, overrides: list[str] | None = None) -> Path:
    """Write run_dir/report/{report.md, report.html, *.png} and students/NAME/README.md; returns the report
    directory."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    run_dir = Path(cfg.run_dir)
    results_path = run_dir / "eval" / "results.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path}: no eval results; run `distill eval CONFIG` first")
    results = json.loads(results_path.read_text())
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    logs = {n: load_train_log(run_dir / "students" / n / "train_log.json") for n in results["students"]}
    details = {n: training_details(run_dir, n, cfg) for n in results["students"]}
    plots = make_plots(results, logs, out)
    (out / "report.md").write_text(render_markdown(results, plots, details))
    (out / "report.html").write_text(render_html(results, plots, details))
    for name in results["students"]:
        student_dir = run_dir / "students" / name
        if student_dir.is_dir():
            model_card(name, student_dir, results, details[name], logs[name], cfg).save(student_dir / "README.md")
    return out
