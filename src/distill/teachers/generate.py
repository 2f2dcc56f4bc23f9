"""The generate stage: prompts -> teacher -> store, resumable, shardable over workers.

Run as: `distill generate cfg.yaml [generate.top_k=20 ...] [--shard 0/4]`, or `distill.generate(config)`.

Every prompt gets a key from (rendered prompt, teacher, generation parameters); keys already in the store are
skipped, so a rerun after a crash, a kill or an API outage only does the missing work. Worker i of n (from
`generate.shard` / `--shard i/n`, else RANK/WORLD_SIZE as set by torchrun and accelerate, else SLURM) takes
every n-th prompt from i and writes its own shard files into the one store.

A generate with nothing left to do writes nothing, so one store can be shared by several runs without
making the others think it changed. A row the store cannot take (text that is not valid Unicode) is left
out and named by its file:line at the end; the other rows are kept.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from distill.config import Config, ConfigError, save_config
from distill.data.cot import request_reasoning, split_completion
from distill.data.prompts import Record, fit_prompt, load_records, render_prompt
from distill.errors import disk_errors
from distill.store.integrity import RowError, StoreError
from distill.store.shards import Store, row_key
from distill.teachers import Completion, Prompt, TeacherError, build_teacher, teacher_identity
from distill.teachers.registry import backend_spec

console = Console(stderr=True)


def worker_shard(spec: str | None = None, env: dict | None = None) -> tuple[int, int]:
    """(worker index, number of workers) from 'i/n', else the launcher's environment, else (0, 1)."""
    env = os.environ if env is None else env
    if spec:
        try:
            i, n = (int(x) for x in str(spec).split("/"))
        except ValueError:
            raise ConfigError(f"generate.shard: expected 'i/n' such as '0/4', got {spec!r}") from None
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"generate.shard: need 0 <= i < n, got {spec!r}")
        return i, n
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if env.get(size_var):
            return int(env.get(rank_var, 0)), int(env[size_var])
    return 0, 1


def generation_params(config: Config) -> dict:
    """The settings that change a teacher output: part of every key and of the store's identity."""
    g = config.generate
    params = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
              "stop": list(g.stop), "top_k": g.top_k, "reasoning": g.reasoning}
    if g.temperature > 0:
        params["seed"] = g.seed  # greedy outputs do not depend on the seed
    if g.reasoning:  # the request and the split change what is stored
        params.update(reasoning_prompt=g.reasoning_prompt, answer_marker=g.answer_marker)
    if backend_spec(config.teacher.backend).remote and config.teacher.extra_body:
        params["extra_body"] = config.teacher.extra_body
    if backend_spec(config.teacher.backend).remote and config.teacher.tokenizer:  # rows then carry prompt ids
        params["tokenizer"] = config.teacher.tokenizer
    return params


def store_meta(config: Config) -> dict:
    """The store's identity (store.json, and every shard's metadata): one store holds one teacher + setting."""
    return {"teacher": teacher_identity(config.teacher), "params": generation_params(config)}


def _prompt_tokenizer(config: Config):
    """The tokenizer whose chat template renders prompts (backends with tokenizer access), loaded without the
    model."""
    if not backend_spec(config.teacher.backend).tokenizer_access:
        return None
    if not config.teacher.model:
        raise TeacherError("teacher.model is not set: give a hub id, a local directory or a .gguf file")
    from distill.modeling import load_tokenizer_for

    try:
        return load_tokenizer_for(config.teacher.model, trust_remote_code=config.teacher.trust_remote_code)
    except OSError as exc:
        raise TeacherError(f"teacher.model '{config.teacher.model}': cannot load its tokenizer ({exc})") from exc


def teacher_context(config: Config) -> int | None:
    """The local teacher's context length from its config.json (None for API teachers or when unknown)."""
    if not backend_spec(config.teacher.backend).local_weights or not config.teacher.model:
        return None
    try:
        from transformers import AutoConfig

        mc = AutoConfig.from_pretrained(config.teacher.model, trust_remote_code=config.teacher.trust_remote_code)
    except (OSError, ValueError):
        return None
    mc = getattr(mc, "text_config", None) or mc
    n = next((getattr(mc, f) for f in ("max_position_embeddings", "n_positions", "max_seq_len")
              if isinstance(getattr(mc, f, None), int)), None)
    return n


def make_prompts(records: list[Record], config: Config, tokenizer=None, context: int | None = None) -> list[Prompt]:
    """Rendered, keyed prompts for the whole corpus; repeats of one prompt are numbered so each gets a row.
    With `context` (the teacher's), a prompt that leaves no room for generate.max_new_tokens (at most half the
    context) is refused with file:line, or cut under data.truncate."""
    identity, params = teacher_identity(config.teacher), generation_params(config)
    seen: Counter = Counter()
    prompts = []
    # room for generate.max_new_tokens after the prompt, but never more than half the context (max_new_tokens
    # is a cap: most answers stop at EOS long before it)
    room = min(config.generate.max_new_tokens, (context or 0) // 2)
    limit = None if context is None or tokenizer is None else context - room
    templated = bool(config.data.chat_template and getattr(tokenizer, "chat_template", None))
    why = f" (the teacher's context {context} minus {room} tokens of room for the answer)"
    truncated = 0
    for i, record in enumerate(records):
        if config.generate.reasoning:  # chain of thought: ask for reasoning + answer (distill.data.cot)
            record = request_reasoning(record, config.generate.reasoning_prompt)
        text = render_prompt(record, tokenizer, config.data)
        if limit is not None:
            text, cut = fit_prompt(text, record.source, tokenizer, limit, config.data.truncate, not templated, why)
            truncated += cut
        n = seen[(text, str(record.messages))]
        seen[(text, str(record.messages))] += 1
        prompts.append(Prompt(i, record, text, row_key(text, record.messages, identity, params, n)))
    if truncated:
        console.print(f"[yellow]data.truncate:[/] {truncated} of {len(records)} prompts cut to {limit} tokens{why}",
                      highlight=False, soft_wrap=True)
    return prompts


def store_row(prompt: Prompt, c: Completion, teacher: str) -> dict:
    return {
        "key": prompt.key, "index": prompt.index, "prompt": prompt.text, "messages": prompt.record.messages,
        "reference": prompt.record.reference, "response": c.text, "reasoning": c.reasoning,
        "prompt_ids": c.prompt_ids, "response_ids": c.token_ids, "response_tokens": c.tokens,
        "topk_ids": c.topk_ids, "topk_logprobs": c.topk_logprobs, "topk_tokens": c.topk_tokens, "tail": c.tail,
        "finish_reason": c.finish_reason, "teacher": teacher, "n_tokens": c.num_tokens(),
        "source": prompt.record.source or f"prompt {prompt.index}",  # names the row if the store refuses it
    }


class TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} tok/s", style="cyan")


def _device_for(rank: int, world: int, config: Config) -> str | None:
    """One GPU per local rank when several workers share a machine and the device is 'auto'."""
    if world == 1 or config.teacher.device != "auto" or not backend_spec(config.teacher.backend).takes_device:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local % torch.cuda.device_count()}"


def generate(config: Config) -> Path:
    """Fill the store with teacher outputs for every prompt of generate.input; returns the store path."""
    g = config.generate
    if not g.input:
        raise ConfigError("generate.input: not set; give a .jsonl/.json/.parquet/.csv file or hf:DATASET")
    rank, world = worker_shard(g.shard)
    worker = f"w{rank:03d}of{world:03d}"
    path = config.path(g.store)
    identity = teacher_identity(config.teacher)
    records = load_records(g.input, config.data, limit=g.limit)
    tokenizer = _prompt_tokenizer(config)
    prompts = make_prompts(records, config, tokenizer, teacher_context(config))[rank::world]
    with disk_errors(path, f"rows finished before are kept in {path}"), \
            Store(path, g.shard_rows, worker=worker, meta=store_meta(config)) as store:
        done = store.done_keys()
        todo = [p for p in prompts if p.key not in done]
        where = f" (worker {rank}/{world})" if world > 1 else ""
        console.print(f"[bold]generate[/]{where}: {len(prompts)} prompts, {len(prompts) - len(todo)} already "
                      f"in {path}, {len(todo)} to do", highlight=False, soft_wrap=True)
        if todo:  # nothing to do writes nothing: the store stays byte for byte as other runs saw it
            save_config(config, path / f"config.{worker}.yaml")
            refused = _run(config, todo, store, identity, _device_for(rank, world, config), tokenizer)
            if refused:
                raise StoreError(f"{len(refused)} of {len(todo)} prompts could not be stored and were left out "
                                 f"(the other rows are kept in {path}): {'; '.join(refused[:3])}"
                                 f"{' ...' if len(refused) > 3 else ''}; fix them in {g.input} and rerun: "
                                 "only the missing rows are generated")
    return path


def _run(config: Config, todo: list[Prompt], store: Store, identity: str, device, tokenizer) -> list[str]:
    """Generate `todo` into the store; returns why each row the store refused was left out."""
    teacher = _build(config, device, tokenizer)
    refused: list[str] = []
    columns = (TextColumn("[bold]teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
               TokensPerSecond(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    rows = tokens = 0
    start = time.perf_counter()
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("generate", total=len(todo), tokens=0)
            for prompt, completion in teacher.generate(todo, config.generate):
                if config.generate.reasoning:  # reasoning and answer go to separate columns
                    completion = split_completion(completion, config.generate.answer_marker)
                try:
                    store.add(store_row(prompt, completion, identity))
                except RowError as exc:  # this row only; the ones before and after it are stored
                    refused.append(str(exc))
                    console.print(f"[yellow]left out:[/] {exc}", highlight=False, soft_wrap=True)
                    continue
                rows += 1
                tokens += completion.num_tokens()
                progress.update(task, advance=1, tokens=tokens)
    except KeyboardInterrupt:
        console.print(f"stopped: the {rows} rows finished in this run are kept in {store.path}; rerun to resume",
                      highlight=False, soft_wrap=True)
        raise
    finally:
        teacher.close()
    elapsed = time.perf_counter() - start
    console.print(f"generated {rows} rows, {tokens} tokens in {elapsed:.1f}s "
                  f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s)", highlight=False, soft_wrap=True)
    return refused


def _build(config: Config, device, tokenizer):
    return build_teacher(config, device, tokenizer)
