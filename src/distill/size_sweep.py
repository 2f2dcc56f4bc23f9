"""`distill sweep`: which student to ship. A ladder of student sizes trained on one store, evaluated on one
held-out set, plotted against the teacher, and the smallest student that keeps enough of the teacher named.

Each size N is a student of at most teacher params / N parameters in the teacher's architecture, a valid config
shaped by the minitron chooser (`students.minitron.choose_shape`): `init: minitron` (cut from the teacher) keeps
head_dim and drops whole key/value groups; `init: config` (fresh weights) keeps the teacher's query and key/value
heads and shrinks head_dim (even, for rotary embeddings) with the width. The students are written into
one ordinary `distill run` config (`students: [x3, x10, ...]`), so generation runs once, every student trains on
the same store, all are evaluated on the same held-out prompts, and a rerun skips whatever already finished.

The recommendation is the smallest student whose % of the teacher's score has a 95% lower bound (the paired
bootstrap of distill.evaluation.stats, stored by `distill eval`) at or above the threshold.

(The module is `size_sweep`, not `sweep`, so that `distill.sweep` stays the public function after any import.)

Run as: `distill sweep cfg.yaml --sizes 3,10,30 --init config --threshold 0.9` (writes RUN_DIR/sweep/).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from distill.config import Config, StudentConfig, load_config
from distill.errors import ConfigError

DEFAULT_SIZES = (3.0, 10.0, 30.0, 100.0)
DEFAULT_THRESHOLD = 0.9
SWEEP_DIR = "sweep"
INITS = ("config", "minitron")
AXES = {  # x axis of a frontier (results key) -> its short name in sweep.md
    "params": "size",
    "latency_ms_p50": "latency",
    "cost_per_million_tokens": "cost",
}


# ---------------------------------------------------------------- the ladder


def parse_sizes(text: str | list[float] | tuple[float, ...]) -> list[float]:
    """'3,10,30' -> [3.0, 10.0, 30.0] (sorted, unique); each size is how many times smaller than the teacher."""
    items = text.split(",") if isinstance(text, str) else list(text)
    sizes = []
    for item in items:
        try:
            size = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"--sizes: '{item}' is not a number; give sizes like 3,10,30,100") from None
        if not size > 1:
            raise ConfigError(f"--sizes: {item} must be above 1 (how many times smaller than the teacher)")
        sizes.append(size)
    if not sizes:
        raise ConfigError("--sizes: give at least one size, e.g. 3,10,30,100")
    return sorted(set(sizes))


def student_name(size: float) -> str:
    """3.0 -> 'x3', 2.5 -> 'x2.5': the student's name and directory."""
    return f"x{size:g}"


def _base_model(cfg: Config, init: str) -> tuple[str, str]:
    """(the model whose architecture the students take, its config key): student.model for `init: config` when
    given (an API teacher's stand-in; sizes are then relative to it), else the teacher (minitron cuts it)."""
    if init == "config" and cfg.student.model:
        return cfg.student.model, "student.model"
    if not cfg.teacher.model:
        raise ConfigError("teacher.model: `distill sweep` shapes students from the teacher's config; set "
                          "teacher.model (or student.model for init=config with an API teacher)")
    return cfg.teacher.model, "teacher.model"


def _model_config(path: str, key: str, trust_remote_code: bool):
    from transformers import AutoConfig

    p = Path(path)
    try:
        if p.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read the config of {path} to shape the sweep's students "
                          f"({str(exc).splitlines()[0][:200]})") from None


@dataclasses.dataclass
class Rung:
    """One size of the ladder: its name, parameter target and chosen shape."""

    size: float
    name: str
    target_params: int
    shape: dict[str, int]
    params: int  # of the chosen shape (built on the meta device)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_ladder(model_config, sizes: list[float], base: StudentConfig, init: str,
                dropped: list[str] | None = None) -> tuple[int, list[Rung]]:
    """(teacher params, one Rung per size): the shape `choose_shape` picks for teacher params / size, keeping
    the shape fields fixed in student.config (e.g. a depth). A size no student can reach (or one giving the same
    student as a larger size) is a ConfigError naming the largest size that can be reached; with `dropped` (the
    default ladder, which the user did not choose) it is left out and the reason appended there instead."""
    from distill.students.minitron import (
        SHAPE_FIELDS,
        narrowest_shape,
        shape_params,
        teacher_shape,
    )

    try:
        t = teacher_shape(model_config)
    except ValueError:
        raise ConfigError(f"teacher.model: {type(model_config).__name__} is not a Llama-style decoder (hidden_size, "
                          "intermediate_size, num_attention_heads, num_hidden_layers): `distill sweep` cannot shape "
                          "its students; give each one's student.config and use `distill run`") from None
    teacher = shape_params(model_config, t)
    fixed = {k: v for k, v in base.config.items() if k in SHAPE_FIELDS}
    probe = StudentConfig(init="minitron", config=fixed, num_layers=base.num_layers if init == "minitron" else None)
    try:
        narrow = narrowest_shape(model_config, probe, keep_heads=init == "config")
    except ValueError as exc:  # a size fixed in student.config that the teacher does not allow
        raise ConfigError(str(exc)) from None
    floor = shape_params(model_config, narrow)
    rungs = []
    for size in sizes:
        try:
            rungs.append(_rung(model_config, size, teacher, floor, narrow, probe, init, rungs))
        except ConfigError as exc:
            if dropped is None:
                raise
            dropped.append(re.sub(r"[:;] drop .*$", "", str(exc).removeprefix("--sizes: ")))
    return teacher, rungs


def _rung(model_config, size: float, teacher: int, floor: int, narrow, probe: StudentConfig, init: str,
          rungs: list[Rung]) -> Rung:
    """One size's rung: a ConfigError when no student reaches it or it gives the same student as `rungs` do."""
    from distill.students.minitron import choose_shape, shape_params

    target = int(teacher // size)
    if target < floor:
        outside = shape_params(model_config, dataclasses.replace(narrow, num_hidden_layers=0))
        layers = f"{narrow.num_hidden_layers} layer" + ("s" if narrow.num_hidden_layers > 1 else "")
        raise ConfigError(
            f"--sizes: {size:g}x asks for {target:,} parameters (teacher {teacher:,} / {size:g}), but the smallest "
            f"student of this architecture has {floor:,} ({layers}, hidden {narrow.hidden_size}, "
            f"{narrow.num_attention_heads} heads; embeddings and head alone: {outside:,}); the largest reachable "
            f"size is {teacher / floor:.1f}x: drop {size:g} from --sizes"
        )
    try:
        shape = choose_shape(model_config, probe.model_copy(update={"target_params": target}),
                             keep_heads=init == "config")
    except ValueError as exc:
        raise ConfigError(f"--sizes: {size:g}x: {exc}") from None
    sizes_of = {k: v for k, v in dataclasses.asdict(shape).items() if v is not None}  # head_dim: None = kept
    same = next((r for r in rungs if r.shape == sizes_of), None)
    if same is not None:  # near the floor, neighbouring sizes round to one shape: the same student twice
        raise ConfigError(f"--sizes: {same.size:g}x and {size:g}x give the same student ({sizes_of}); drop one")
    return Rung(size, student_name(size), target, sizes_of, shape_params(model_config, shape))


def ladder_students(base: StudentConfig, rungs: list[Rung], init: str, model_config) -> list[StudentConfig]:
    """The base student (its train overrides, calibration, ...) once per rung, with the rung's shape in
    student.config (for `init: config` over the base's own overrides, head_dim where the family has the field)."""
    students = []
    for rung in rungs:
        config = dict(rung.shape)
        if init == "config":
            config = {**base.config, **config}
            if not hasattr(model_config, "head_dim"):  # the family derives it: hidden / heads, as chosen
                config.pop("head_dim", None)
        students.append(base.model_copy(update={
            "name": rung.name, "init": init, "config": config, "target_params": None, "num_layers": None,
            "layers": None}))
    return students


def sweep_config(cfg: Config, sizes: str | list[float] | None = None, init: str | None = None
                 ) -> tuple[Config, dict[str, Any]]:
    """The `distill run` config of the sweep (students: one per size) and its plan (teacher params, rungs, and the
    default sizes left out as unreachable: `sizes` None means 3,10,30,100 as far as the teacher allows)."""
    if cfg.students:
        raise ConfigError("students: `distill sweep` makes its own students from `student` (one per size); "
                          "remove the students list or use `distill run`")
    init = init or (cfg.student.init if cfg.student.init in INITS else "config")
    if init not in INITS:
        raise ConfigError(f"--init {init}: the sweep shapes students as {' or '.join(INITS)}")
    model_config = _model_config(*_base_model(cfg, init), cfg.teacher.trust_remote_code)
    dropped: list[str] | None = [] if sizes is None else None
    teacher_params, rungs = plan_ladder(model_config, parse_sizes(DEFAULT_SIZES if sizes is None else sizes),
                                        cfg.student, init, dropped)
    if not rungs:
        raise ConfigError(f"--sizes: none of the default sizes can be reached ({'; '.join(dropped or [])}); "
                          "give smaller ones")
    students = ladder_students(cfg.student, rungs, init, model_config)
    run_cfg = load_config({**cfg.model_dump(mode="json"), "students": [s.model_dump(mode="json") for s in students]})
    return run_cfg, {"init": init, "teacher_params": teacher_params, "rungs": [r.as_dict() for r in rungs],
                     "dropped": dropped or []}


# ---------------------------------------------------------------- the verdict of the sweep


def sweep_rows(results: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model (teacher first, then the students, smallest last) from results.json: size, score and its
    interval, % of the teacher with its interval, latency, $/M tokens, memory, collapse and precision flags."""
    verdicts = (results.get("verdict") or {}).get("students") or {}
    rungs = {r["name"]: r for r in plan["rungs"]}
    keys = ("params", "score", "latency_ms_p50", "cost_per_million_tokens", "peak_memory_bytes")
    t = results["teacher"]
    teacher_ci = next((v["ci"].get("teacher_score") for v in verdicts.values() if v.get("ci")), None)
    rows = [{"name": "teacher", "teacher": True, **{k: t.get(k) for k in keys}, "percent_of_teacher": 100.0,
             "score_ci": teacher_ci}]
    for name, s in results["students"].items():
        if name not in rungs:
            continue
        v = verdicts.get(name) or {}
        ci = v.get("ci") or {}
        rows.append({
            "name": name, "teacher": False, "size": rungs[name]["size"], "target_params": rungs[name]["target_params"],
            "shape": rungs[name]["shape"], **{k: s.get(k) for k in keys},
            "percent_of_teacher": s.get("percent_of_teacher"), "score_ci": ci.get("score"),
            "retention_ci": ci.get("percent_of_teacher"), "n": ci.get("n"),
            "collapsed": bool((v.get("collapse") or {}).get("collapsed")),
            "collapse_reasons": (v.get("collapse") or {}).get("reasons") or [], "precision": v.get("precision"),
        })
    return rows


def lower_bound(row: dict[str, Any]) -> float | None:
    """The 95% lower bound of the % of the teacher's score a student keeps (None when it has no interval)."""
    ci = row.get("retention_ci")
    return None if not ci else ci[0]


def pareto_frontier(rows: list[dict[str, Any]], x_key: str) -> list[str]:
    """Names of the models no other model beats on both axes (lower `x_key`, higher score), by rising x: the
    models worth shipping at some budget. Rows missing either value are left out."""
    points = sorted((r for r in rows if r.get(x_key) is not None and r.get("score") is not None),
                    key=lambda r: (r[x_key], -r["score"]))
    frontier, best = [], None
    for r in points:
        if best is None or r["score"] > best:
            frontier.append(r["name"])
            best = r["score"]
    return frontier


def recommend(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The smallest student (fewest parameters) whose retention lower bound is >= 100 * threshold; ties in size go
    to the higher lower bound, then the name. When none qualifies: the one that came closest (highest lower
    bound; ties to the smaller). Pure: rows as `sweep_rows` makes them."""
    students = [r for r in rows if not r.get("teacher")]
    need = 100 * threshold
    ok = [r for r in students if lower_bound(r) is not None and lower_bound(r) >= need]
    out: dict[str, Any] = {"threshold": threshold, "recommended": None, "closest": None}
    if ok:
        pick = min(ok, key=lambda r: (r["params"], -lower_bound(r), r["name"]))
        out["recommended"] = pick["name"]
        out["text"] = (f"ship {pick['name']}: {pick['params']:,} parameters, keeps {pick['percent_of_teacher']:.1f}% of "
                       f"the teacher (95% lower bound {lower_bound(pick):.1f}% >= {need:.0f}%)")
        if pick.get("collapsed"):
            out["text"] += f"; but it collapsed: {'; '.join(pick['collapse_reasons'])}"
        return out
    bounded = [r for r in students if lower_bound(r) is not None]
    if not bounded:
        out["text"] = (f"no student qualifies for {need:.0f}% of the teacher: none has a retention interval "
                       "(the teacher scored 0, or no held-out prompt has a reference)")
        return out
    near = max(bounded, key=lambda r: (lower_bound(r), -r["params"], r["name"]))
    out["closest"] = near["name"]
    out["text"] = (f"no student qualifies: none keeps {need:.0f}% of the teacher at the 95% lower bound; closest: "
                   f"{near['name']} ({near['params']:,} parameters, {near['percent_of_teacher']:.1f}%, lower bound "
                   f"{lower_bound(near):.1f}%)")
    return out


def precision_warning(rows: list[dict[str, Any]]) -> str | None:
    """One line when the held-out set is too small for the intervals the recommendation rests on (the widest
    student interval, from the verdict's precision check)."""
    flagged = [r["precision"] for r in rows if r.get("precision")]
    if not flagged:
        return None
    worst = max(flagged, key=lambda p: p["half_width"])
    return (f"the held-out set ({worst['n']} prompts) is too small for this precision: % of the teacher is known to "
            f"±{worst['half_width']:.1f} points; about {worst['prompts_needed']:,} prompts would give "
            f"±{worst['limit']:.0f} (eval.input)")


def metric_name(spec: str) -> str:
    """'exact_match' -> itself; a user metric 'path/to/metrics.py:variety' -> 'variety' (for titles and labels)."""
    return spec.rpartition(":")[2]


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ci_cell(value: float | None, ci: list[float] | None, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) + ("" if not ci else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def sweep_markdown(summary: dict[str, Any]) -> str:
    """sweep.md: the recommendation, warnings, the table (frontier models marked) and the plot."""
    rows, rec = summary["rows"], summary["recommendation"]
    lines = [f"# Which student to ship: {len(rows) - 1} sizes, init `{summary['init']}`", "",
             (f"**Recommendation** (threshold {100 * rec['threshold']:.0f}% of the teacher's "
              f"{metric_name(summary['metric'])}, 95% lower bound): {rec['text']}."), ""]
    lines += [f"⚠ {w}." for w in summary["warnings"]] + ([""] if summary["warnings"] else [])
    lines += [("| model | size | shape (layers × hidden, heads/kv, mlp) | params | score [95% CI] | % of teacher "
              "[95% CI] | p50 latency ms | $/M tokens | on the frontier of |"), "|" + "---|" * 9]
    for r in rows:
        sh = r.get("shape")
        shape = "teacher" if not sh else (f"{sh['num_hidden_layers']} × {sh['hidden_size']}, "
                                          f"{sh['num_attention_heads']}/{sh['num_key_value_heads']}, "
                                          f"{sh['intermediate_size']}")
        marks = ", ".join(AXES[k] for k, names in summary["frontier"].items() if r["name"] in names)
        name = f"**{r['name']}**" if r["name"] == rec["recommended"] else r["name"]
        size = "1x" if r["teacher"] else f"{r['size']:g}x"
        lines.append(
            f"| {name}{' (collapsed)' if r.get('collapsed') else ''} | {size} "
            f"| {shape} | {_cell(r['params'], ',')} | {_ci_cell(r['score'], r.get('score_ci'), '.3f')} "
            f"| {_ci_cell(r['percent_of_teacher'], r.get('retention_ci'), '.1f')} | {_cell(r['latency_ms_p50'], '.1f')} "
            f"| {_cell(r['cost_per_million_tokens'], '.4f')} | {marks} |")
    if summary.get("plot"):
        lines += ["", f"![score vs parameters, latency and $/M tokens]({Path(summary['plot']).name})"]
    lines += ["", (f"Every student trained on the same store and was evaluated on the same {summary['n_prompts']} "
              "held-out prompts. Frontier: no other model is both smaller (or faster, or cheaper) and better. "
              "Intervals: paired bootstrap over prompts (`distill eval`'s verdict).")]
    return "\n".join(lines) + "\n"


def write_sweep(run_dir: Path, results: dict[str, Any], plan: dict[str, Any], threshold: float) -> dict[str, Any]:
    """RUN_DIR/sweep/sweep.json, sweep.md and sweep.png from the eval results; returns the summary."""
    from distill.reporting.sweep_plots import plot_sweep

    out = run_dir / SWEEP_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(results, plan)
    rec = recommend(rows, threshold)
    warnings = [f"left out of the default sizes: {d}" for d in plan.get("dropped", [])]
    warnings += [w for w in [precision_warning(rows)] if w]
    warnings += [f"{r['name']} collapsed: {'; '.join(r['collapse_reasons'])}" for r in rows if r.get("collapsed")]
    frontier = {k: pareto_frontier(rows, k) for k in AXES}
    plot = plot_sweep(rows, frontier, rec["recommended"], metric_name(results["metric"]), out / "sweep.png")
    summary = {**plan, "metric": results["metric"], "n_prompts": results["n_prompts"], "rows": rows,
               "frontier": frontier, "recommendation": rec, "warnings": warnings,
               "plot": None if plot is None else str(plot), "markdown": str(out / "sweep.md")}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    (out / "sweep.md").write_text(sweep_markdown(summary))
    return summary


def sweep(config: Config | str | Path | dict, sizes: str | list[float] | None = None, init: str | None = None,
          threshold: float = DEFAULT_THRESHOLD, overrides: list[str] | None = None, force: bool = False) -> dict:
    """Train, evaluate and compare one student per size; returns the summary written to RUN_DIR/sweep/sweep.json
    (with 'outcome': which pipeline stages ran). `sizes`: '3,10,30' or a list (default: 3, 10, 30, 100, leaving
    out those the teacher's shape cannot reach); `init`: config | minitron (default: student.init when it is one
    of them, else config); `threshold`: the fraction of the teacher's score to keep at the 95% lower bound."""
    from distill.pipeline import run

    if not 0 < threshold <= 2:
        raise ConfigError(f"--threshold {threshold}: give the fraction of the teacher's score to keep, e.g. 0.9")
    cfg = config if isinstance(config, Config) and not overrides else load_config(
        config.model_dump(mode="json") if isinstance(config, Config) else config, overrides)
    run_cfg, plan = sweep_config(cfg, sizes, init)
    outcome = run(run_cfg, force=force)
    results = json.loads((Path(run_cfg.run_dir) / "eval" / "results.json").read_text())
    summary = write_sweep(Path(run_cfg.run_dir), results, plan, threshold)
    return {**summary, "outcome": outcome}
