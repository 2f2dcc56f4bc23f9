"""`distill serve MODEL_DIR`: the student behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE with `stream: true`), /health.
Concurrent requests are batched by one worker (see distill.serving.engine). Logprobs are raw
(temperature 1) and also carry token ids (`token_ids`, `top_token_ids` in completions; `token_id` in each
chat entry); with `return_tokens_as_token_ids` (per request, vLLM's extension, or `--return-tokens-as-token-ids`)
the token strings themselves are "token_id:N", which is what distill's openai teacher reads into ids, so
another distill run can use this server as its teacher. `echo: true` (with `logprobs`, and `max_tokens: 0`
allowed) returns the prompt's teacher-forced logprobs, which is how lm-eval's `local-completions` scores
multiple-choice tasks against this server.

Chat messages are rendered as the student's training rendered its prompts (prompt_format.json, written by
`distill train`), else with the model's chat template; a model with neither gets a 400 naming /v1/completions.
Bodies must be `Content-Type: application/json` (415), one request asks for at most `max_request_rows`
sequences (prompts x n; 400), and requests share the batcher round-robin. /health, /docs and /openapi.json
need no API key.

With `--draft STUDENT_DIR` a teacher is served losslessly faster: the student drafts, the teacher verifies
(distill.serving.speculative); /health reports the draft's acceptance.

Run as: `distill serve runs/demo/students/small --port 8000 --api-key $KEY`
        `distill serve TEACHER_DIR --draft runs/demo/students/distilled`
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.errors import ConfigError, UserError

API_KEY_ENV = "DISTILL_API_KEY"
MODEL_FILES = ("config.json", "adapter_config.json", "quantization.json")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


def check_port(port: int) -> None:
    """A TCP port uvicorn can bind (0: any free port); refused before the model is loaded."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a TCP port is between 0 and 65535 (e.g. --port 8000)")


def check_model_path(path: str | Path) -> None:
    """Refuse, in one line, what is not a model: a run directory (naming its students), a config file, a
    teacher store or any other directory without model files. A missing path is left to the loader."""
    path = Path(str(path))
    hint = "serve a student directory (RUN_DIR/students/NAME) or a .gguf file"
    if path.is_file():
        if path.suffix.lower() in CONFIG_SUFFIXES:
            raise UserError(f"{path} is a config file, not a model; {hint}{_students_hint(_run_dir_of(path))}")
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is not a model; {hint}")
        return
    if not path.is_dir() or any((path / f).is_file() for f in MODEL_FILES):
        return
    students = _students(path)
    if students:
        raise UserError(f"{path} is a run directory, not a model; serve one of its students: "
                        + ", ".join(str(s) for s in students))
    if (path / "store.json").exists() or (path / "shards").is_dir():
        raise UserError(f"{path} is a teacher store, not a model; {hint}{_students_hint(path.parent)}")
    raise UserError(f"{path} has no model (no {' or '.join(MODEL_FILES[:2])}); {hint}")


def _students(run_dir: Path) -> list[Path]:
    """Student directories under RUN_DIR/students (those holding model files)."""
    root = run_dir / "students"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and any((d / f).is_file() for f in MODEL_FILES))


def _run_dir_of(config_file: Path) -> Path:
    """The run_dir a config file names (where its students are), else the file's folder."""
    import yaml

    try:
        run_dir = yaml.safe_load(config_file.read_text()).get("run_dir")
    except Exception:  # noqa: BLE001  (only a hint for the error message)
        run_dir = None
    return Path(run_dir) if isinstance(run_dir, str) else config_file.parent


def _students_hint(run_dir: Path) -> str:
    found = _students(run_dir)
    return f" (found: {', '.join(str(s) for s in found)})" if found else ""


def build_app(
    model_dir: str | Path,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = 1_000_000,
    max_request_rows: int = 1024,
    return_tokens_as_token_ids: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    draft: str | Path | None = None,
    draft_tokens: int = 5,
):
    """Load MODEL_DIR (a full model or a LoRA adapter dir, merged) and wrap it in the app. Chats are rendered
    as the student was trained (its prompt_format.json), else with its chat template, else refused. With
    `draft` (a smaller model with the same vocabulary, e.g. a student of MODEL_DIR), MODEL_DIR's output is
    decoded speculatively (distill.serving.speculative)."""
    from distill.data.prompt_format import load_prompt_format
    from distill.exporting.export import load_student
    from distill.serving import Engine, ServeOptions, create_app

    check_model_path(model_dir)
    model, tokenizer, _ = load_student(model_dir, dtype=dtype, device=device)
    drafter = load_draft(draft, tokenizer, model, dtype, draft_tokens) if draft is not None else None
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, draft=drafter)
    options = ServeOptions(
        served_model_name=served_model_name or Path(str(model_dir)).name,
        api_key=api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None),
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        max_request_rows=max_request_rows,
        return_tokens_as_token_ids=return_tokens_as_token_ids,
        prompt_format=load_prompt_format(model_dir) if Path(str(model_dir)).is_dir() else None,
    )
    return create_app(engine, options)


def load_draft(path: str | Path, tokenizer, model, dtype: str, tokens: int):
    """The draft model on the served model's device, refused in one line unless it has the same vocabulary
    (its proposals are token ids the served model verifies)."""
    from distill.evaluation.generation import vocabulary_mismatch
    from distill.exporting.export import load_student
    from distill.serving.speculative import Drafter

    if tokens < 1:
        raise ConfigError(f"--draft-tokens {tokens}: propose at least 1 draft token per step (e.g. 5)")
    check_model_path(path)
    device = str(next(model.parameters()).device)
    draft, draft_tok, _ = load_student(path, dtype=dtype, device=device)
    reason = vocabulary_mismatch(draft_tok, tokenizer)
    if reason:
        raise UserError(f"--draft {path}: its vocabulary differs from the served model's ({reason}); a draft "
                        "must share the served model's tokenizer (e.g. a student distilled from it)")
    return Drafter(draft.to(device), tokens=tokens)


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **kwargs) -> None:
    """Build the app and run it with uvicorn until interrupted."""
    import uvicorn

    check_port(port)
    app = build_app(model_dir, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
