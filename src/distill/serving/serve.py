"""`distill serve MODEL_DIR`: the student behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE with `stream: true`), /health.
Concurrent requests are batched by one worker (see distill.serving.engine). Logprobs are raw
(temperature 1) and also carry token ids (`token_ids`, `top_token_ids` in completions; `token_id` in each
chat entry); with `return_tokens_as_token_ids` (per request, vLLM's extension, or `--return-tokens-as-token-ids`)
the token strings themselves are "token_id:N", which is what distill's openai teacher reads into ids, so
another distill run can use this server as its teacher. `echo: true` (with `logprobs`, and `max_tokens: 0`
allowed) returns the prompt's teacher-forced logprobs, which is how lm-eval's `local-completions` scores
multiple-choice tasks against this server.

Run as: `distill serve runs/demo/students/small --port 8000 --api-key $KEY`
"""

from __future__ import annotations

import os
from pathlib import Path

API_KEY_ENV = "DISTILL_API_KEY"


def build_app(
    model_dir: str | Path,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = 1_000_000,
    return_tokens_as_token_ids: bool = False,
    dtype: str = "auto",
    device: str = "auto",
):
    """Load MODEL_DIR (a full model or a LoRA adapter dir, merged) and wrap it in the app."""
    from distill.exporting.export import load_student
    from distill.serving import Engine, ServeOptions, create_app

    model, tokenizer, _ = load_student(model_dir, dtype=dtype, device=device)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms)
    options = ServeOptions(
        served_model_name=served_model_name or Path(str(model_dir)).name,
        api_key=api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None),
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        return_tokens_as_token_ids=return_tokens_as_token_ids,
    )
    return create_app(engine, options)


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **kwargs) -> None:
    """Build the app and run it with uvicorn until interrupted."""
    import uvicorn

    app = build_app(model_dir, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
