"""OpenAI request schemas, the OpenAI error shape, and the logprobs response shapes.

Unknown request fields are ignored (like vLLM); known fields this server cannot honour (penalties,
logit_bias, tools, suffix, echo) are a 400 naming the field rather than silently wrong output.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# JSON has no -inf; vLLM reports this floor for impossible tokens, and so do we.
LOGPROB_FLOOR = -9999.0


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc: ValidationError | Any) -> OpenAIError:
    """The first pydantic error as a 400 whose `param` is the dotted field path."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return OpenAIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extension: logprob token strings become "token_id:N" (exact ids; what distill's openai
    # teacher reads when its extra_body sets it). None: the server's default.
    return_tokens_as_token_ids: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported by this server", param=name,
                                  code="unsupported_parameter")
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported by this server", param="logit_bias",
                              code="unsupported_parameter")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise OpenAIError(400, "echo is not supported by this server", param="echo",
                              code="unsupported_parameter")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported by this server", param="suffix",
                              code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "best_of other than n is not supported", param="best_of",
                              code="unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise OpenAIError(400, f"only text content parts are supported (got '{part.type}')",
                                  param=f"messages.{index}.content.{j}", code="unsupported_parameter")
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise OpenAIError(400, "tools are not supported by this server", param="tools",
                              code="unsupported_parameter")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise OpenAIError(400, "only response_format type 'text' is supported",
                              param="response_format", code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs: true", param="top_logprobs",
                              code="invalid_value")


def _lp(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR)


def _name(t, as_ids: bool) -> str:
    return f"token_id:{t.id}" if as_ids else t.text


def completion_logprobs(tokens: list, start_offset: int = 0, as_ids: bool = False) -> dict:
    """OpenAI's legacy completions shape, plus `token_ids` / `top_token_ids` / `top_token_logprobs`:
    the exact ids behind each string (two ids can decode to the same string, which would collide as
    keys of the `top_logprobs` dicts)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                 "token_ids": [], "top_token_ids": [], "top_token_logprobs": []}
    offset = start_offset
    for t in tokens:
        out["tokens"].append(_name(t, as_ids))
        out["token_logprobs"].append(_lp(t.logprob))
        top: dict[str, float] = {}
        for alt in t.top:
            top.setdefault(_name(alt, as_ids), _lp(alt.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        out["token_ids"].append(t.id)
        out["top_token_ids"].append([alt.id for alt in t.top])
        out["top_token_logprobs"].append([_lp(alt.logprob) for alt in t.top])
        offset += len(t.text)
    return out


def chat_logprobs(tokens: list, as_ids: bool = False) -> dict:
    """OpenAI's chat shape; each entry (and each alternative) also carries its `token_id`."""
    content = []
    for t in tokens:
        content.append({
            "token": _name(t, as_ids), "logprob": _lp(t.logprob), "bytes": list(t.bytes), "token_id": t.id,
            "top_logprobs": [{"token": _name(a, as_ids), "logprob": _lp(a.logprob), "bytes": list(a.bytes),
                              "token_id": a.id} for a in t.top],
        })
    return {"content": content, "refusal": None}
