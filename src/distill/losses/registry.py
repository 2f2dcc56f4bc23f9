"""The loss registry: every loss registers itself once, saying what it needs and which parameters it takes.

An entry (`Loss`) declares
- `student`: what the student gives it, "logits" or "hidden" states;
- `teacher`: where its teacher side comes from: "labels" (no teacher: targets are the batch labels), "signal"
  (the teacher signal of the student's tokenizer, dense or sparse), "hidden" (an online teacher's hidden states)
  or "tokenizer" (the teacher reads its own tokenization: cross-tokenizer, aligned by response position);
- `signals`: the teacher shapes it accepts ("dense", "sparse");
- `params`: a pydantic model of its user parameters (config `train.losses[i].params`), validated at config load
  and at every call: an unknown name is a TypeError with a did-you-mean, a value out of range a ValueError;
- `context`: keywords the trainer supplies from its own state (hidden-state projections, the cross-tokenizer
  vocabulary match), never set by the user.

`logit_loss(name, ...)` turns a body `body(student_logits, teacher, mask, settings, **params)` into the public
function with the one logit-loss call shape and registers it; `register` does it for any other call shape.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError


class NoParams(BaseModel):
    """A loss without user parameters."""

    model_config = ConfigDict(extra="forbid")


class LossParams(NoParams):
    """Base of every loss's typed parameters (unknown keys are refused)."""


@dataclass(frozen=True)
class LogitSettings:
    """The settings every logit loss shares (the trainer's, not one loss's)."""

    temperature: float = 1.0
    scale_temperature: bool = True
    num_items_in_batch: int | torch.Tensor | None = None
    sparse_mode: str = "tail"
    chunk_size: int | None = None
    vocab_size: int | None = None


@dataclass(frozen=True)
class Loss:
    """One registered loss; calling it calls its function."""

    name: str
    fn: Callable[..., torch.Tensor]
    student: Literal["logits", "hidden"] = "logits"
    teacher: Literal["labels", "signal", "hidden", "tokenizer"] = "signal"
    signals: frozenset[str] = frozenset({"dense", "sparse"})
    params: type[BaseModel] = NoParams
    context: tuple[str, ...] = ()
    doc: str = field(default="", compare=False)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    @property
    def needs_teacher(self) -> bool:
        return self.teacher != "labels"

    def parse_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validated parameters with defaults filled in; raises UnknownParam / InvalidParam naming the key."""
        known = list(self.params.model_fields)
        for key in params:
            if key not in self.params.model_fields:
                raise UnknownParam(self.name, key, known)
        try:
            return self.params.model_validate(params).model_dump()
        except ValidationError as err:
            e = err.errors()[0]
            key = ".".join(str(p) for p in e["loc"])
            why = f"{e['msg'][0].lower()}{e['msg'][1:]} (got {e.get('input')!r})"
            allowed = _allowed(self.params, str(e["loc"][0]))
            raise InvalidParam(self.name, key, why + (f"; allowed: {allowed}" if allowed else "")) from None


def _allowed(model: type[BaseModel], key: str) -> str:
    """'0 <= beta <= 1' from a field's ge/gt/le/lt constraints ('' when it has none)."""
    field_info = model.model_fields.get(key)
    low = high = ""
    for c in field_info.metadata if field_info else ():
        for attr, side, sign in (("ge", "low", "<="), ("gt", "low", "<"), ("le", "high", "<="), ("lt", "high", "<")):
            value = getattr(c, attr, None)
            if value is not None and side == "low":
                low = f"{value} {sign} "
            elif value is not None:
                high = f" {sign} {value}"
    return f"{low}{key}{high}" if low or high else ""


class UnknownParam(TypeError):
    """A loss parameter the loss does not take (TypeError, as Python's unexpected keyword argument)."""

    def __init__(self, loss: str, key: str, known: list[str]):
        hint = difflib.get_close_matches(key, known, n=1)
        self.key = key
        super().__init__(
            f"{key}: {loss} takes no parameter '{key}'"
            + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" (its parameters: {', '.join(known) or 'none'})"
        )


class InvalidParam(ValueError):
    """A loss parameter with a value out of its range or of the wrong type."""

    def __init__(self, loss: str, key: str, why: str):
        self.key = key
        super().__init__(f"{key}: {loss} parameter '{key}': {why}")


LOSSES: dict[str, Loss] = {}


def register(name: str, fn: Callable[..., torch.Tensor], **needs: Any) -> Loss:
    """Add `fn` under `name` with what it needs (see `Loss`); a name is registered once."""
    if name in LOSSES:
        raise ValueError(f"loss '{name}' is already registered")
    entry = Loss(name, fn, **needs)
    LOSSES[name] = entry
    return entry


def split_kwargs(entry: Loss, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(validated user params, trainer context) from a call's extra keywords."""
    context = {k: kwargs.pop(k) for k in entry.context if k in kwargs}
    return entry.parse_params(kwargs), context


def logit_loss(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    teacher: Literal["labels", "signal", "tokenizer"] = "signal",
    signals: frozenset[str] = frozenset({"dense", "sparse"}),
    context: tuple[str, ...] = (),
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register body(student_logits, teacher, mask, settings: LogitSettings, **params, **context) as `name`.

    The public function: `fn(student_logits, teacher, mask=None, *, temperature=1.0, scale_temperature=True,
    num_items_in_batch=None, sparse_mode="tail", chunk_size=None, vocab_size=None, **params)`.
    """

    def wrap(body: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def loss(
            student_logits: torch.Tensor,
            teacher: Any,
            mask: torch.Tensor | None = None,
            *,
            temperature: float = 1.0,
            scale_temperature: bool = True,
            num_items_in_batch: int | torch.Tensor | None = None,
            sparse_mode: str = "tail",
            chunk_size: int | None = None,
            vocab_size: int | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            user, ctx = split_kwargs(entry, kwargs)
            settings = LogitSettings(
                temperature, scale_temperature, num_items_in_batch, sparse_mode, chunk_size, vocab_size
            )
            return body(student_logits, teacher, mask, settings, **user, **ctx)

        loss.__name__ = loss.__qualname__ = name
        loss.__doc__ = body.__doc__
        loss.__module__ = body.__module__
        entry = register(
            name, loss, teacher=teacher, signals=signals, params=params, context=context, doc=body.__doc__ or ""
        )
        return loss

    return wrap


def describe_params(name: str) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, description) of one loss's parameters, for `distill config` and docs."""
    model = LOSSES[name].params
    return [
        (key, getattr(f.annotation, "__name__", str(f.annotation)), f.default, f.description or "")
        for key, f in model.model_fields.items()
    ]
