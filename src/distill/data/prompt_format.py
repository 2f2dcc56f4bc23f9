"""The prompt format a student was trained with, saved with it, so serving renders chats the same way.

Training renders each prompt with `render_prompt` under the run's `data` settings (the chat template or plain
text, a system prompt), plus what chain of thought adds (the reasoning request, a task prefix). A served
student only sees the model directory, so `distill train` writes that rule into it as `prompt_format.json`,
and `render_chat` turns chat messages into exactly the text training would have rendered for them.

A prompt row (`{"prompt": text}`) renders as its text when no template or system prompt applies, a chat row
as a "role: content" transcript; `chat_rows` records which kind the training data had, so a one-question chat
request is rendered as the student saw its questions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import DataConfig
from distill.data.cot import request_reasoning
from distill.data.encoding import uses_template
from distill.data.prompts import Record, iter_rows, render_prompt

PROMPT_FORMAT_FILE = "prompt_format.json"


@dataclass(frozen=True)
class PromptFormat:
    """How training rendered a prompt: `prefix` + render_prompt(messages with `suffix` on the last user turn)."""

    chat_template: bool  # rendered with the tokenizer's chat template
    system_prompt: str | None = None
    chat_rows: bool = False  # training prompts were chat messages (a single question: a transcript, not text)
    prefix: str = ""  # chain of thought two_task: the task prefix the student answers to
    suffix: str = ""  # generate.reasoning without train.cot: the reasoning request the student saw


def training_prompt_format(cfg: Any, tokenizer: Any, teacher_renders_locally: bool) -> PromptFormat:
    """The rule a `distill train` run under `cfg` rendered its prompts with. Store prompts were rendered by the
    teacher: with the chat template only when it renders locally (an API teacher's store holds plain text)."""
    cot = cfg.train.cot
    prefix = ""
    if cot.mode == "two_task":
        prefix = cot.answer_prefix if cot.inference == "answer" else cot.rationale_prefix
    from_store = not cfg.train.input or cfg.train.signal == "offline"
    templated = uses_template(tokenizer, cfg.data) and (teacher_renders_locally or not from_store)
    suffix = cfg.generate.reasoning_prompt if cfg.generate.reasoning and from_store and cot.mode == "off" else ""
    source = cfg.train.input if cfg.train.input and not from_store else cfg.generate.input
    return PromptFormat(chat_template=templated, system_prompt=cfg.data.system_prompt,
                        chat_rows=_chat_rows(source, cfg.data), prefix=prefix, suffix=suffix)


def _chat_rows(source: str | None, data: DataConfig) -> bool:
    """Whether the first row of a local prompt file is a chat (its `messages`, or a TRL message-list prompt)."""
    if not source or not Path(str(source)).exists():
        return False
    try:
        _, row = next(iter_rows(source, data.split))
    except Exception:  # noqa: BLE001  (training already read this file; the shape is a hint, not a check)
        return False
    messages = row.get(data.messages_field)
    return (messages is not None and messages != "") or isinstance(row.get(data.prompt_field), list)


def save_prompt_format(out: str | Path, fmt: PromptFormat) -> None:
    (Path(out) / PROMPT_FORMAT_FILE).write_text(json.dumps(dataclasses.asdict(fmt), indent=1) + "\n")


def load_prompt_format(model_dir: str | Path) -> PromptFormat | None:
    """The saved rule of a student directory; None when it has none (not trained by distill, or before it)."""
    path = Path(model_dir) / PROMPT_FORMAT_FILE
    if not path.is_file():
        return None
    known = {f.name for f in dataclasses.fields(PromptFormat)}
    data = json.loads(path.read_text())
    return PromptFormat(**{k: v for k, v in data.items() if k in known})


def render_chat(messages: list[dict[str, str]], tokenizer: Any, fmt: PromptFormat) -> str:
    """The text training would have rendered for these chat messages (the generation prompt included)."""
    single = len(messages) == 1 and messages[0]["role"] == "user"
    record = Record(prompt=messages[0]["content"]) if single and not fmt.chat_rows else Record(messages=messages)
    if fmt.suffix:
        record = request_reasoning(record, fmt.suffix)  # DataError: no user turn
    cfg = DataConfig(chat_template=fmt.chat_template, system_prompt=fmt.system_prompt)
    return fmt.prefix + render_prompt(record, tokenizer, cfg)

