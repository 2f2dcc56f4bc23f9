"""OpenAI request schemas, the OpenAI error shape, and the logprobs response shapes.

Unknown request fields are ignored (like vLLM); known fields this server cannot honour (penalties,
logit_bias, tools, suffix) are a 400 naming the field rather than silently wrong output. Known fields are
validated strictly: `true` is not the integer 1, `"0.5"` is not a number, text must be valid Unicode (a lone
surrogate such as the JSON escape `\\udc80` is refused here, not deep in the tokenizer), and a seed must
fit in 64 bits, so every bad value is a 400 naming its field before any generation starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

# JSON has no -inf; vLLM reports this floor for impossible tokens, and so do we.
LOGPROB_FLOOR = -9999.0
# OpenAI allows 4 stop sequences; lm-eval adds the EOS string to a task's own, and vLLM has no limit.
# Each one is searched for at every decoded token, so the count is bounded (a 400 naming `stop` above).
MAX_STOP = 64
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as vLLM takes it


def _valid_unicode(text: str) -> str:
    """JSON may carry a lone surrogate (`"\\udc80"`): a Python str, but no text a tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate at character {exc.start}, which is not valid Unicode; "
                         "send UTF-8 text (a surrogate pair for characters outside the BMP)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


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
    """The most telling pydantic error as a 400 whose `param` is the dotted field path: when a union's
    branches all fail, a branch's type mismatch (`str` for a list) says less than a bad value inside the
    branch that matched in shape (a lone surrogate in `prompt.1`)."""
    errors = exc.errors()
    telling = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    first = (telling or errors or [{"loc": (), "msg": str(exc)}])[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    return OpenAIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _union_tag(part) -> bool:
    """pydantic names the branch of a union in an error's location (`str`, `list[int]`, `ContentPart`):
    not part of the field path a client sent."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none")
                                      or not re.fullmatch(r"[a-z_][a-z0-9_]*", part))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # vLLM's extension: logprob token strings become "token_id:N" (exact ids; what distill's openai
    # teacher reads when its extra_body sets it). None: the server's default.
    return_tokens_as_token_ids: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences (got {len(stops)})")
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
    prompt: Text | list[Text] | list[int] | list[list[int]]
    # OpenAI's default for completions; 0 only with echo (score the prompt, generate nothing)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False  # the prompt comes back before the completion, with its logprobs when asked
    best_of: int | None = None
    suffix: Text | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        """One clear message instead of one per union branch; bools are not token ids."""
        def ids(x) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str) or (isinstance(v, list) and (all(isinstance(x, str) for x in v) or ids(v)
                                                             or all(ids(x) for x in v))):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers) "
                         "or a list of lists of token ids")

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens must be at least 1 (0 only with echo: true, to score the prompt)",
                              param="max_tokens", code="invalid_value")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported by this server", param="suffix",
                              code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, "best_of other than n is not supported", param="best_of",
                              code="unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Text
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

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


def _lp(x: float | None) -> float | None:
    return None if x is None else max(float(x), LOGPROB_FLOOR)


def _name(t, as_ids: bool) -> str:
    return f"token_id:{t.id}" if as_ids else t.text


def completion_logprobs(tokens: list, start_offset: int = 0, as_ids: bool = False, special=frozenset()) -> dict:
    """OpenAI's legacy completions shape, plus `token_ids` / `top_token_ids` / `top_token_logprobs`:
    the exact ids behind each string (two ids can decode to the same string, which would collide as
    keys of the `top_logprobs` dicts). A token without a logprob (the first echoed prompt token: nothing
    predicts it) has `null` for its logprob and its top_logprobs, as OpenAI and vLLM answer. Ids in
    `special` add no text (special tokens are left out of the decoded text) to the offsets."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [],
                 "token_ids": [], "top_token_ids": [], "top_token_logprobs": []}
    offset = start_offset
    for t in tokens:
        out["tokens"].append(_name(t, as_ids))
        out["token_logprobs"].append(_lp(t.logprob))
        top: dict[str, float] | None = None if t.logprob is None else {}
        for alt in t.top:
            top.setdefault(_name(alt, as_ids), _lp(alt.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        out["token_ids"].append(t.id)
        out["top_token_ids"].append(None if top is None else [alt.id for alt in t.top])
        out["top_token_logprobs"].append(None if top is None else [_lp(alt.logprob) for alt in t.top])
        if t.id not in special:
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
