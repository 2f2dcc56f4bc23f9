"""Chain-of-thought distillation (Distilling step-by-step, Hsieh et al. 2023).

Generation (`generate.reasoning: true`): each prompt gets `generate.reasoning_prompt` appended (to the prompt,
or to the last user message of a chat), e.g. "Think step by step, then give the final answer after 'Answer:'";
the teacher's output is split at the last `generate.answer_marker` (or at `</think>` for reasoning models)
into the store's `reasoning` and `response` columns. API backends that return reasoning separately
(`reasoning_content`) keep theirs. `response_ids` and top-k rows still cover the whole completion.

Training (`train.cot.mode`):
- two_task: every row gives two examples, "[answer] " + prompt -> answer and "[rationale] " + prompt ->
  rationale (followed by the answer marker and the answer when `rationale_with_answer`). The loss is
  alpha * answer + (1 - alpha) * rationale, applied as per-token weights 2 * alpha and 2 * (1 - alpha), so the
  global-batch token normalisation (and gradient accumulation) stays exact; alpha = 0.5 is the plain loss.
- trace: one example per row, prompt -> reasoning + marker + answer.
At inference the task prefix selects the behaviour (`student_prompt`): "[answer] " gives a bare answer,
"[rationale] " the reasoning first.

Run as: `distill generate cfg.yaml generate.reasoning=true` then `distill train cfg.yaml train.cot.mode=two_task`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.config import Config, CotConfig
from distill.data.batching import tokenize_pair
from distill.data.encoding import uses_template
from distill.data.prompts import DataError, Record

THINK_CLOSE = "</think>"


# ------------------------------------------------------------------------------------------- generation side


def request_reasoning(record: Record, suffix: str) -> Record:
    """The record with the reasoning request appended: to the prompt, or to the last user message of a chat."""
    if record.messages is None:
        return dataclasses.replace(record, prompt=(record.prompt or "") + suffix)
    messages = [dict(m) for m in record.messages]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise DataError(f"{record.source}: chat messages have no user turn to ask for reasoning in")
    messages[users[-1]]["content"] = messages[users[-1]]["content"] + suffix
    return dataclasses.replace(record, messages=messages)


def split_reasoning(text: str, marker: str = "Answer:") -> tuple[str | None, str]:
    """(reasoning, answer) of a teacher output; reasoning is None when the output has no separator.

    `<think>...</think>` (reasoning models) wins; else the text is cut at the *last* marker, so a marker
    quoted inside the reasoning does not end it early.
    """
    if THINK_CLOSE in text:
        head, _, tail = text.partition(THINK_CLOSE)
        reasoning = head.replace("<think>", "", 1).strip()
        answer = tail.strip()
        if marker and marker in answer:
            answer = answer.rsplit(marker, 1)[1].strip()
        return (reasoning or None), answer
    if marker and marker in text:
        head, tail = text.rsplit(marker, 1)
        return (head.strip() or None), tail.strip()
    return None, text.strip()


def split_completion(completion: Any, marker: str) -> Any:
    """A teacher `Completion` with text = the answer and reasoning set (kept if the backend gave it)."""
    if completion.reasoning is not None:
        return completion
    reasoning, answer = split_reasoning(completion.text, marker)
    return dataclasses.replace(completion, text=answer, reasoning=reasoning)


# --------------------------------------------------------------------------------------------- training side


def student_prompt(prompt: str, cot: CotConfig, task: str | None = None) -> str:
    """The prompt a two-task student sees: the task prefix (default `cot.inference`) before the prompt."""
    if cot.mode != "two_task":
        return prompt
    task = task or cot.inference
    if task not in ("answer", "rationale"):
        raise ValueError(f"task must be 'answer' or 'rationale', got {task!r}")
    return (cot.answer_prefix if task == "answer" else cot.rationale_prefix) + prompt


def trace_text(reasoning: str, answer: str, marker: str, sep: str = "\n") -> str:
    """Reasoning, `sep`, the marker and the answer: the whole trace the teacher was asked for."""
    reasoning, answer = reasoning.strip(), answer.strip()
    return f"{reasoning}{sep}{marker} {answer}" if marker else f"{reasoning}{sep}{answer}"


def trace_separator(tokenizer) -> str:
    """A newline between reasoning and answer when the tokenizer can write one, else a space (a character
    vocabulary without "\n", like the math tutor's, would turn it into <unk>)."""
    if tokenizer is None:
        return "\n"
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return "\n" if ids and tokenizer.decode(ids, skip_special_tokens=True) == "\n" else " "


def cot_pairs(rows: Iterable[dict], cfg: Config, sep: str = "\n") -> list[tuple[str, str, float]]:
    """(student prompt, target, loss weight) for every row with a reasoning, per `train.cot`; `sep` goes
    between the reasoning and the answer marker in rationale / trace targets."""
    cot, marker, suffix = cfg.train.cot, cfg.generate.answer_marker, cfg.generate.reasoning_prompt
    out = []
    for row in rows:
        reasoning, answer = row.get("reasoning"), row.get("response")
        if not reasoning or answer is None:
            continue
        prompt = row["prompt"]
        if suffix and suffix in prompt:  # the student is not told how to format: the prefix/trace says it
            prompt = prompt.replace(suffix, "", 1)
        if cot.mode == "trace":
            out.append((prompt, trace_text(reasoning, answer, marker, sep), 1.0))
            continue
        rationale = trace_text(reasoning, answer, marker, sep) if cot.rationale_with_answer else reasoning
        out.append((student_prompt(prompt, cot, "answer"), answer, 2.0 * cot.alpha))
        out.append((student_prompt(prompt, cot, "rationale"), rationale, 2.0 * (1.0 - cot.alpha)))
    return out


def read_cot_rows(cfg: Config, tokenizer=None) -> tuple[Iterable[dict], str]:
    """Rows with prompt / reasoning / response: from `train.input` (fields prompt, reasoning and
    train.response_field) when set, else from the teacher store. Returns (rows, where they came from)."""
    if cfg.train.input:
        from distill.data.prompts import iter_rows, record_from_row, render_prompt

        rows = []
        for where, row in iter_rows(cfg.train.input, cfg.data.split):
            record = record_from_row(row, where, cfg.data)
            rows.append({"prompt": render_prompt(record, tokenizer, cfg.data), "reasoning": row.get("reasoning"),
                         "response": row.get(cfg.train.response_field), "where": where})
        return rows, str(cfg.train.input)
    from distill.store.reader import StoreReader

    path = cfg.path(cfg.train.store or cfg.generate.store)
    if not Path(path).exists():
        raise DataError(f"{path}: teacher store not found; run `distill generate` with generate.reasoning=true")
    return StoreReader(path, columns=["index", "prompt", "reasoning", "response"]), str(path)  # text only


def no_reasoning_message(rows: Sequence[dict], source: str, cfg: Config) -> str:
    """What did not match when no row split into reasoning + answer: the marker, and a teacher output."""
    marker = cfg.generate.answer_marker
    if not rows:
        return f"{source}: no rows; generate the store with generate.reasoning=true"
    if cfg.train.input:
        return (f"{source}: no row has both a 'reasoning' and a '{cfg.train.response_field}' field "
                f"(fields of the first row: {', '.join(k for k in rows[0] if k != 'where')})")
    meta = Path(source) / "store.json"
    params = json.loads(meta.read_text()).get("params", {}) if meta.exists() else {}
    if params and not params.get("reasoning"):
        return (f"{source}: the store was generated without generate.reasoning=true, so it has no reasoning "
                "column; set it and regenerate (into a new generate.store, or remove this one)")
    marker = params.get("answer_marker", marker)
    example = next((r.get("response") for r in rows if r.get("response")), "")
    return (f"{source}: 0 of {len(rows)} teacher outputs contain the answer marker {marker!r} (nor </think>), "
            f"so none split into reasoning + answer; e.g. {example[:120]!r}. Set generate.answer_marker to "
            "the text this teacher writes between its steps and its answer (and generate.reasoning_prompt to "
            "what makes it write one), then regenerate")


def build_cot_examples(cfg: Config, tokenizer) -> list[dict]:
    """Tokenised two-task or trace examples, each with its `loss_weight`."""
    rows, source = read_cot_rows(cfg, tokenizer)
    pairs = cot_pairs(rows, cfg, trace_separator(tokenizer))
    if not pairs:
        raise DataError(no_reasoning_message(rows, source, cfg))
    out = []
    for prompt, target, weight in pairs:
        ex = tokenize_pair(tokenizer, prompt, target, cfg.train.max_length, uses_template(tokenizer, cfg.data))
        if ex is not None:
            ex["loss_weight"] = weight
            out.append(ex)
    return out


@dataclass
class WeightedCollator:
    """Wraps a collator and adds the examples' `loss_weight` as a (batch,) tensor (1.0 when absent)."""

    base: Any

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        batch["loss_weight"] = torch.tensor([float(e.get("loss_weight", 1.0)) for e in examples])
        return batch
