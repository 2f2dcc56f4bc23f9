"""The one model-card writer: README.md with Hub metadata, for `distill report` (in each student directory)
and `distill export` (in the export directory, keeping the student's card).

Built with `huggingface_hub.ModelCard` / `ModelCardData` / `EvalResult`, so the front matter is what the Hub
parses: library, tags, `base_model` (the teacher's hub id; omitted for a local path or an API teacher),
`datasets` (hub datasets the run read, `hf:NAME` inputs), `metrics`, `license` and a `model-index` with the
task score, the % of the teacher's score, parameters, size and latency. Training facts (steps, epochs,
examples and tokens seen) come from what the trainer recorded (train_summary.json, else trainer_state.json of
the last checkpoint), never from the config's limits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TAGS = ["distill", "distillation"]
TASK = "text-generation"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(ref: str | Path | None) -> str | None:
    """`ref` if it names a Hub repo (`org/name`, not an existing local path), else None."""
    if ref is None:
        return None
    text = str(ref)
    if not _HUB_ID.match(text) or Path(text).exists():
        return None
    return text


def dataset_ids(inputs: list[str | None]) -> list[str]:
    """Hub dataset ids among the run's inputs (`hf:NAME`), in order, once each."""
    out: list[str] = []
    for spec in inputs:
        if spec and str(spec).startswith("hf:") and str(spec)[3:] not in out:
            out.append(str(spec)[3:])
    return out


def teacher_license(teacher: str | Path | None) -> str | None:
    """The license a local teacher's own card declares (a distilled model inherits its teacher's terms)."""
    if teacher is None or not (Path(str(teacher)) / "README.md").is_file():
        return None
    data, _ = load_card(Path(str(teacher)) / "README.md")
    return data.license if data is not None else None


# ---------------------------------------------------------------- training facts


def _last_trainer_state(student_dir: Path) -> dict:
    """trainer_state.json of the last checkpoint under run_dir/checkpoints/NAME (if training left one)."""
    ckpts = student_dir.parent.parent / "checkpoints" / student_dir.name
    states = sorted(ckpts.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    return json.loads(states[-1].read_text()) if states else {}


def training_facts(student_dir: str | Path) -> dict[str, Any]:
    """What training did, as the trainer's state recorded it: steps, epochs (fractional), examples and tokens
    seen, learning rate, runtime. Missing facts are None."""
    d = Path(student_dir)
    summary_path = d / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    state = _last_trainer_state(d)
    steps = summary.get("global_steps", state.get("global_step"))
    epochs = summary.get("epochs", state.get("epoch"))
    examples = summary.get("examples")
    tokens = summary.get("tokens_seen") or state.get("num_input_tokens_seen") or None
    if not tokens and summary.get("train_tokens") and epochs is not None:
        tokens = round(summary["train_tokens"] * epochs)  # tokens of one pass x the epochs done
    return {
        "steps": steps,
        "epochs": epochs,
        "examples": examples,
        "examples_seen": round(examples * epochs) if examples and epochs is not None else None,
        "tokens_seen": tokens,
        "learning_rate": summary.get("learning_rate"),
        "runtime_s": summary.get("train_runtime_s"),
        "train_loss": summary.get("train_loss"),
    }


def training_lines(facts: dict[str, Any]) -> list[str]:
    """Markdown bullets for the facts there are."""
    lines = []
    if facts.get("steps") is not None:
        bits = [f"{facts['steps']:,} optimizer steps"]
        if facts.get("epochs") is not None:
            bits.append(f"{facts['epochs']:.2f} epochs")
        if facts.get("examples_seen"):
            bits.append(f"{facts['examples_seen']:,} examples seen ({facts['examples']:,} distinct)")
        if facts.get("tokens_seen"):
            bits.append(f"{facts['tokens_seen']:,} tokens seen")
        lines.append("- Trained for " + ", ".join(bits))
    if facts.get("learning_rate") is not None:
        lines.append(f"- Peak learning rate {facts['learning_rate']:g}")
    if facts.get("runtime_s") is not None:
        lines.append(f"- Training time: {facts['runtime_s']:.0f} s")
    return lines


# ---------------------------------------------------------------- metadata


def eval_results(results: dict, name: str) -> list:
    """model-index entries for student `name`: task score, % of teacher, parameters, size, latency p50."""
    from huggingface_hub import EvalResult

    s = results["students"][name]
    metric = results["metric"]
    given = str(results.get("eval_input") or "held-out")
    dataset = given[3:] if given.startswith("hf:") else Path(given).stem  # a hub dataset keeps its id
    figures = [
        (metric, metric, s.get("score")),
        ("percent_of_teacher", f"% of teacher {metric}", s.get("percent_of_teacher")),
        ("parameters", "parameters", s.get("params")),
        ("size_mb", "size on disk (MB)", s["bytes_on_disk"] / 1e6 if s.get("bytes_on_disk") else None),
        ("latency_ms_p50", "latency p50, batch 1 (ms)", s.get("latency_ms_p50")),
    ]
    return [
        EvalResult(task_type=TASK, dataset_type=dataset, dataset_name=dataset, metric_type=kind,
                   metric_name=label,
                   metric_value=value if isinstance(value, int) else round(float(value), 6))
        for kind, label, value in figures if value is not None
    ]


def card_data(name: str, *, base_model: str | None = None, adapter: bool = False, datasets: list[str] | None = None,
              license: str | None = None, metrics: list[str] | None = None, results: list | None = None,
              extra_tags: list[str] | None = None):
    from huggingface_hub import ModelCardData

    return ModelCardData(
        model_name=name if results else None,  # only the model-index uses it (a bare `model_name` key is not Hub metadata)
        library_name="peft" if adapter else "transformers",
        pipeline_tag=TASK,
        tags=[*TAGS, *(extra_tags or [])],
        base_model=base_model,
        datasets=datasets or None,
        metrics=metrics or None,
        license=license or "other",
        eval_results=results or None,
    )


def render(data, body: str):
    """A ModelCard from metadata and markdown body (what `ModelCard.load` reads back)."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def load_card(path: str | Path):
    """(metadata, body) of an existing README.md; metadata None when it has no front matter."""
    from huggingface_hub import ModelCard

    text = Path(path).read_text()
    if not text.startswith("---"):
        return None, text
    card = ModelCard(text, ignore_metadata_errors=True)
    return card.data, card.text


# ---------------------------------------------------------------- the two cards


def student_card(name: str, student_dir: Path, results: dict, *, intro: str, method: list[str],
                 eval_table: str, setup: str, datasets: list[str] | None = None):
    """The card `distill report` writes into a student directory (a ModelCard; `.save(path)` writes it).
    `eval_table`: the markdown table of the student's figures next to the teacher's (report.py formats it)."""
    s, t = results["students"][name], results["teacher"]
    adapter = bool(s.get("adapter"))
    if adapter:
        cfg = student_dir / "adapter_config.json"
        base = json.loads(cfg.read_text()).get("base_model_name_or_path") if cfg.is_file() else None
    else:
        base = None if t.get("api") else t.get("path")
    facts = training_facts(student_dir)
    data = card_data(name, base_model=hub_id(base), adapter=adapter, datasets=datasets,
                     license=teacher_license(None if t.get("api") else t.get("path")),
                     metrics=[results["metric"]], results=eval_results(results, name))
    load = (
        "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{student_dir}").merge_and_unload()\n'
        if adapter
        else "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{student_dir}")\n'
    ) + f'tokenizer = AutoTokenizer.from_pretrained("{student_dir}")'
    body = "\n".join([
        f"# {name}", "", intro, "",
        "## Training", "", *method, *training_lines(facts), "",
        "## Evaluation", "", setup, "", eval_table, "",
        "## Use", "", "```python", load, "```", "",
        "Serve it behind an OpenAI-compatible API:", "", "```bash", f"distill serve {student_dir}", "```",
    ])
    return render(data, body)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _export_sections(report: dict, name: str) -> list[str]:
    src = report["source"]
    origin = (f"LoRA adapter `{src['adapter']}` merged into `{src['base']}`" if src.get("adapter")
              else f"`{src['source']}`")
    lines = [
        f"# {name}", "", "A student model distilled and exported with distill (`distill export`).", "",
        "| | |", "|---|---|",
        f"| source | {origin} |", f"| architecture | {report['architecture']} |",
        f"| parameters | {report['parameters']:,} |", f"| dtype | {report['dtype']} |",
        f"| size (safetensors) | {_mb(report['bytes'])} |", "",
        "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained('{name}')",
        f"tokenizer = AutoTokenizer.from_pretrained('{name}')", "```", "",
        f"Serve it: `distill serve {name}` (OpenAI-compatible API).",
    ]
    if "int8" in report:
        q, p = report["int8"], report["int8"]["parity"]
        lines += [
            "", "## int8 (torchao)", "",
            (f"`int8/`: {_mb(q['bytes'])} ({q['size_ratio']:.0%} of full precision), {q['quantized_modules']} "
             f"linear layers with int8 per-row weights (torchao, scheme `{q['scheme']}`); the output head stays "
             "in float. It is a plain transformers checkpoint (torchao installed):"), "",
            "```python", "from transformers import AutoModelForCausalLM",
            f"model = AutoModelForCausalLM.from_pretrained('{name}/int8')", "```", "",
            (f"Parity with full precision on {p['prompts']} {q['held_out']} held-out prompts ({p['tokens']} "
             f"tokens): greedy-token agreement {p['greedy_token_agreement']:.1%}, top-1 agreement "
             f"{p['top1_agreement']:.1%}, mean KL {p['mean_kl']:.2e}."),
        ]
    if "gguf" in report:
        g = report["gguf"]
        fname = Path(g["path"]).name
        lines += [
            "", "## GGUF (llama.cpp, Ollama, LM Studio)", "",
            (f"`{fname}` ({_mb(g['bytes'])}, `{g['type']}`, llama.cpp architecture `{g['architecture']}`, "
             f"tokenizer included). Logits of the file loaded back with transformers vs the student: max abs "
             f"diff {g['max_abs_logit_diff']:.2e}."), "",
            "```bash", f"llama-cli -m {name}/{fname} -p 'Q: 2 + 3 = ? A:'", "```", "",
            "```python", "from transformers import AutoModelForCausalLM",
            f"model = AutoModelForCausalLM.from_pretrained('{name}', gguf_file='{fname}')", "```",
        ]
    if "onnx" in report:
        o = report["onnx"]
        lines += [
            "", "## ONNX", "",
            (f"`onnx/model.onnx` ({_mb(o['bytes'])}): inputs `input_ids`, `attention_mask` (int64, dynamic "
             f"batch and sequence), output `logits`. onnxruntime vs PyTorch max abs diff {o['max_abs_diff']:.2e}."),
            "",
            "```python", "import onnxruntime as ort",
            f"session = ort.InferenceSession('{name}/onnx/model.onnx')",
            "logits = session.run(['logits'], {'input_ids': ids, 'attention_mask': mask})[0]", "```",
        ]
    return lines


def export_card(report: dict, name: str, source_card: Path | None = None):
    """The card `distill export` writes: the student's card metadata (base model, model-index, datasets,
    license) when it has one, plus what was exported and how to load each artifact; the student card's
    text follows under "From the training run"."""
    data, source_text = (None, None)
    if source_card is not None and source_card.is_file():
        data, source_text = load_card(source_card)
    if data is None:
        data = card_data(name, adapter=False)
    else:  # the export is a merged full model: it loads with transformers, not peft
        data.library_name = "transformers"
        bases = data.base_model if isinstance(data.base_model, list) else [data.base_model]
        kept = [b for b in bases if hub_id(b)]  # e.g. PEFT's own card names the base by its local path
        data.base_model = (kept if len(kept) > 1 else kept[0]) if kept else None
    tags = list(data.tags or [])
    for tag in (*TAGS, *(t for t in ("int8", "gguf", "onnx") if t in report)):
        if tag not in tags:
            tags.append(tag)
    data.tags = tags
    if not data.license:
        data.license = "other"
    body = "\n".join(_export_sections(report, name))
    if source_text:
        body += "\n\n## From the training run\n\n" + ("\n" + source_text.strip()).replace("\n#", "\n##").lstrip("\n")
    return render(data, body)
