"""The fused linear path: logits projected from hidden states chunk by chunk inside the loss, never all at once.

A model's forward at vocabulary 152k and 8 x 4,096 tokens produces 20 GB of logits before any loss runs. Here
the loss takes the final hidden states and the output projection instead (`LinearLogits`), and for each chunk
of counted tokens projects the chunk through `lm_head`, computes the per-token loss and its gradient w.r.t. the
chunk's logits, turns that into gradients of the hidden states, of the projection weight and of its bias, and
frees the chunk (one custom autograd.Function, as Liger Kernel's `LigerFusedLinearDistillationBase` and
torchtune's chunked output losses do). An online teacher with the same tokenizer is a `LinearLogits` too: its
rows are projected per chunk as well, without a gradient.

Peak memory of the loss: about chunk_size x vocab x (a few fp32 buffers) plus one weight-sized gradient,
instead of several tokens x vocab tensors. Same value and gradients as projecting first (tests).
  hidden: (batch, seq, d); weight: (vocab, d); bias: (vocab,) or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Largest chunk of logits the fused path holds, in elements (32 MB in fp32): chunk_size tokens at most, fewer at
# large vocabularies (170 tokens at 49k, 55 at 152k), as Liger sizes its chunks by vocab / hidden. Smaller chunks
# cost no speed on CPU (measured at 152k: 55 vs 384 tokens, benchmarks/fused_loss.py; the matmuls stay
# compute-bound at 55 rows) and bound the peak.
CHUNK_ELEMENTS = 2**23
# Tokens per loss chunk unless configured: the one default of `distill train` (train.chunk_size) and of
# DistillationTrainer(chunk_size=...); CHUNK_ELEMENTS lowers it at large vocabularies.
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class LinearLogits:
    """Logits left unprojected: `hidden @ weight.T + bias`, shaped (batch, seq, vocab) like the logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dim(self) -> int:
        return self.hidden.dim()

    def cut(self, vocab: int) -> LinearLogits:
        """Only the first `vocab` rows of the projection (padded embedding rows dropped)."""
        if vocab >= self.weight.shape[0]:
            return self
        return LinearLogits(self.hidden, self.weight[:vocab], None if self.bias is None else self.bias[:vocab])

    def detach(self) -> LinearLogits:
        return LinearLogits(
            self.hidden.detach(), self.weight.detach(), None if self.bias is None else self.bias.detach()
        )

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (n, d) hidden states -> (n, vocab) logits, in the model's dtype (as its lm_head gives them)."""
        return F.linear(rows.to(self.weight.dtype), self.weight, self.bias)

    def materialise(self) -> torch.Tensor:
        return self.project(self.hidden)


def cut_vocab(x: torch.Tensor | LinearLogits, vocab: int) -> torch.Tensor | LinearLogits:
    return x.cut(vocab) if isinstance(x, LinearLogits) else x[..., :vocab]


def gather_rows(x: torch.Tensor | LinearLogits, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The (b, s) rows of a (batch, seq, ...) payload; a LinearLogits payload is projected (no gradient)."""
    if isinstance(x, LinearLogits):
        with torch.no_grad():
            return x.project(x.hidden[b, s])
    return x[b, s]


def chunked_argmax(x: LinearLogits, chunk_size: int = 1024) -> torch.Tensor:
    """(batch, seq) argmax over the vocabulary, projecting chunk_size positions at a time."""
    flat = x.hidden.reshape(-1, x.hidden.shape[-1])
    with torch.no_grad():
        out = torch.cat([x.project(flat[i : i + chunk_size]).argmax(-1) for i in range(0, flat.shape[0], chunk_size)])
    return out.reshape(x.hidden.shape[:-1])


def chunk_loss(token_fn: Callable[..., torch.Tensor], rows: torch.Tensor, rest: list, needs_grad: bool):
    """One chunk's summed loss (detached) and its gradient w.r.t. `rows` (None when no gradient is needed)."""
    if not needs_grad:
        return token_fn(rows, *rest).sum().detach(), None
    with torch.enable_grad():
        rows = rows.detach().requires_grad_(True)
        loss = token_fn(rows, *rest).sum()
        (g,) = torch.autograd.grad(loss, rows)
    return loss.detach(), g


def take_grads(ctx, what: str):
    """Hand over the gradients a chunked forward stored (once: a second backward pass has none left)."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(
            f"the {what} supports one backward pass (its stored gradients are handed over); "
            "use chunk_size=None for retain_graph, double backward or gradcheck"
        )
    return grads


@dataclass
class Term:
    """One loss's share of a fused pass: the sum of token_fn over the pass's tokens it counts, times `coef`.

    token_fn: (rows (n, vocab), *payload rows) -> (n,); payload: teacher tensors shaped (batch, seq, ...) or
    LinearLogits; member: (tokens of the pass,) bool, the tokens this term counts (None: all of them); vocab: the
    student rows it reads (the first `vocab`); coef: a float or a scalar tensor (normalisation, T^2, weights).
    """

    token_fn: Callable[..., torch.Tensor]
    payload: tuple
    member: torch.Tensor | None
    vocab: int
    coef: float | torch.Tensor = 1.0


def _payload_key(p: torch.Tensor | LinearLogits) -> tuple:
    """Equal for the same data (each loss detaches its own view of the teacher, so the objects differ)."""
    parts = (p.hidden, p.weight, p.bias) if isinstance(p, LinearLogits) else (p,)
    return tuple(None if x is None else (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype) for x in parts)


def _chunk_terms(logits: torch.Tensor, terms: list[Term], b, s, start: int, sums: list) -> torch.Tensor:
    """sum_i coef_i * sum token_fn_i over one chunk's logits (n, vocab); each term's own sum is added to sums[i].

    A teacher payload shared by several terms (the same data) is gathered, or projected, once per chunk.
    """
    cache: dict[int, torch.Tensor] = {}
    total = logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    for i, term in enumerate(terms):
        rows, sel = logits, None
        if term.member is not None:
            member = term.member[start : start + logits.shape[0]]
            if not bool(member.all()):
                sel = member.nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                rows = rows[sel]
        if term.vocab < rows.shape[-1]:
            rows = rows[:, : term.vocab]
        rest = []
        for p in term.payload:
            key = _payload_key(p)
            if key not in cache:
                cache[key] = gather_rows(p, b, s)
            rest.append(cache[key] if sel is None else cache[key][sel])
        part = term.token_fn(rows, *rest).sum()
        sums[i] += part.detach()
        total = total + term.coef * part
    return total


class _FusedLinearTerms(torch.autograd.Function):
    """sum_i coef_i * sum token_fn_i(hidden[b, s] @ weight.T + bias, *payload_i rows) over the tokens (b_idx, s_idx).

    Forward walks the tokens `chunk_size` at a time: project once, every term's loss on that projection, d loss /
    d logits, then d hidden = g @ W, d W += g^T h, d bias += sum g; only those three gradient buffers outlive a
    chunk. Backward scales them by the incoming gradient (one backward pass: the buffers are handed over).
    Each term's own (unscaled) sum is added to `sums` (detached), for logging.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, b_idx, s_idx, chunk_size, terms, sums):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        grad_h = torch.zeros_like(hidden) if need_h else None
        # bf16 / fp16 weights: their gradients are summed over chunks in fp32 (one rounding at the end, as one
        # big matmul would give), at the price of a weight-sized fp32 buffer
        acc = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        grad_w = grad_b = None  # the first chunk's product, then summed into (no weight-sized zero fill)
        total = torch.zeros(
            (), dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32, device=hidden.device
        )
        for start in range(0, b_idx.numel(), chunk_size):
            b, s = b_idx[start : start + chunk_size], s_idx[start : start + chunk_size]
            h = hidden[b, s].to(weight.dtype)
            loss, g = chunk_loss(lambda rows, b=b, s=s, start=start: _chunk_terms(rows, terms, b, s, start, sums), F.linear(h, weight, bias),
                                 [], need_h or need_w or need_b)  # fmt: skip
            if grad_h is not None:
                grad_h[b, s] = (g @ weight).to(grad_h.dtype)
            if need_w and grad_w is None:
                grad_w = (g.t() @ h).to(acc)
            elif need_w and acc == weight.dtype:
                grad_w.addmm_(g.t(), h)
            elif need_w:
                grad_w.add_(g.t() @ h)
            if need_b:
                grad_b = g.sum(0).to(acc) if grad_b is None else grad_b.add_(g.sum(0))
            total += loss
            del h, loss, g
        if need_w and grad_w is None:  # no token counted
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        if need_b and grad_b is None:
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grads = take_grads(ctx, "fused linear loss")
        scaled = [None if g is None else g.mul_(grad_out.to(g.dtype)).to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*scaled, None, None, None, None, None)


def fused_terms(
    student: LinearLogits, b_idx: torch.Tensor, s_idx: torch.Tensor, terms: list[Term], chunk_size: int | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum_i coef_i * term_i's token sum, [term_i's token sum, detached]) with the student's logits projected
    inside the loss, once per chunk for all the terms.

    chunk_size None: the rows are projected at once under plain autograd (exact, not memory-saving, but it still
    projects only the counted tokens, not the prompt and padding). Otherwise chunks hold at most chunk_size
    tokens and CHUNK_ELEMENTS logits.
    """
    student = student.cut(max(term.vocab for term in terms))
    dtype = torch.float64 if student.weight.dtype == torch.float64 else torch.float32
    sums = [torch.zeros((), dtype=dtype, device=student.device) for _ in terms]
    if chunk_size is None:
        logits = student.project(student.hidden[b_idx, s_idx])
        return _chunk_terms(logits, terms, b_idx, s_idx, 0, sums), sums
    chunk_size = max(1, min(chunk_size, CHUNK_ELEMENTS // student.weight.shape[0]))
    total = _FusedLinearTerms.apply(
        student.hidden, student.weight, student.bias, b_idx, s_idx, chunk_size, terms, sums
    )
    return total, sums


def fused_token_sum(
    token_fn: Callable[..., torch.Tensor],
    student: LinearLogits,
    b_idx: torch.Tensor,
    s_idx: torch.Tensor,
    payload: tuple,
    chunk_size: int | None,
) -> torch.Tensor:
    """Sum of token_fn over the selected tokens with the student's logits projected inside the loss (one term)."""
    term = Term(token_fn, payload, None, student.weight.shape[0])
    return fused_terms(student, b_idx, s_idx, [term], chunk_size)[0]


# ------------------------------------------------------------------------------------ models without projecting

# Config fields of models that transform the logits after lm_head (Gemma's soft-capping, Cohere's and
# Granite's scales): the fused path would skip that, so those models keep the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's lm_head when the fused path can stand in for it (a plain Linear, nothing after it), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.weight.dim() != 2 or head.weight.shape[0] == 0:
        return None  # no head, a LoRA-wrapped or quantised one, or a sharded (ZeRO-3) weight
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _LOGIT_TRANSFORMS):
        return None
    return head


def forward_unprojected(model: torch.nn.Module, head: torch.nn.Linear, **inputs) -> tuple[object, LinearLogits]:
    """Run `model(**inputs)` with its lm_head skipped: (outputs, LinearLogits of every position).

    The head is called on an empty slice of the hidden states (so it computes nothing) and hands back its input,
    so the model's own forward runs unchanged (DDP's hooks, masks, caches) and `outputs.logits` holds the final
    hidden states (batch, seq, d) instead of (batch, seq, vocab) logits.
    """
    seen: list[torch.Tensor] = []

    def before(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    def after(module, args, output):
        # + the (empty, so exactly 0) projection: keeps lm_head in the forward's autograd graph, so DDP with
        # find_unused_parameters (the Trainer's default) does not mark its weight ready before the loss uses it
        hidden = seen.pop()
        return hidden + output.sum().to(hidden.dtype) if torch.is_grad_enabled() and output.requires_grad else hidden

    hooks = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        outputs = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, LinearLogits(outputs.logits, head.weight, head.bias)
