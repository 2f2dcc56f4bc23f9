"""Shared machinery of the logit losses: token selection, normalisation, temperature, sparse buckets, chunking.

Every logit loss is a per-token divergence between two log-distributions over the same support
("buckets"), summed over the counted tokens:

- dense teacher: the buckets are the (aligned) vocabulary: log_softmax(logits / T) on both sides;
- sparse teacher, ``sparse_mode="tail"``: k + 1 buckets, the teacher's top-k ids plus one tail bucket holding
  the mass outside them (teacher: its stored tail, or 1 - sum p_topk; student: the exact log-sum-exp of its
  log-probs outside the top-k ids, so no ``1 - sum`` cancellation);
- sparse teacher, ``sparse_mode="renormalize"``: k buckets, both sides renormalised over the teacher's top-k.

Rules kept here so that each loss module is only its formula: fp32 log-softmax, masked tokens dropped before
any arithmetic (garbage or inf logits there can't reach the value or the gradient), `torch.where` guards
wherever -inf meets -inf, the sum divided by the global token count (``num_items_in_batch``) or this call's
count, and T^2 scaling. The chunked path (`chunk_size`) runs the same per-token function on `chunk_size`
tokens at a time inside one autograd.Function that stores only the gradient w.r.t. the student logits; a
`LinearLogits` student (hidden states + lm_head, losses/fused.py) is projected chunk by chunk inside the loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch

from distill.losses.fused import (
    LinearLogits,
    Term,
    chunk_loss,
    cut_vocab,
    fused_terms,
    fused_token_sum,
    gather_rows,
    take_grads,
)
from distill.losses.registry import LogitSettings, LossParams, NoParams, logit_loss
from distill.losses.vocab import check_sparse_ids, common_vocab, student_vocab
from distill.signals import SparseSignal

NEG_INF = float("-inf")
SPARSE_MODES = ("tail", "renormalize")
# Smallest teacher tail mass used when the top-k does not cover the vocabulary: a stored tail of exactly 0
# (rounding of fp16 logprobs) would make reverse-KL-like losses infinite wherever the student has tail mass.
TAIL_FLOOR = 1e-8
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)
# log q below this counts as this (about 1e-44, under float32's normal range): see kl_terms.
LOG_Q_FLOOR = -100.0

# (student rows (n, vocab) any dtype, *teacher payload rows) -> per-token loss (n,) float32
TokenFn = Callable[..., torch.Tensor]
# (student log-probs (n, C), teacher log-probs (n, C)) -> per-token divergence (n,)
Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------- safe log-space ops


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits lose too much in log-softmax); float64 stays (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


# True while the rows being compared are known finite (dense model logits, the common case): the guards
# below then cost a dozen extra passes over tokens x vocab for nothing, so the plain formulas are used.
_FINITE = contextvars.ContextVar("distill_losses_finite", default=False)


@contextlib.contextmanager
def assume_finite(flag: bool) -> Iterator[None]:
    token = _FINITE.set(flag)
    try:
        yield
    finally:
        _FINITE.reset(token)


def kl_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q), 0 where p == 0, with no NaN in value or gradient.

    `kl_div(lq, lp, log_target=True)` gives 0 * (-inf - -inf) = NaN where both are -inf, and even a
    `where` on its output leaks NaN gradients; so the -inf slots are replaced before any arithmetic.
    log q is floored at LOG_Q_FLOOR: where q has no mass (a teacher that bans a token, as the q of reverse
    KL) the loss is then large and finite with a strong gradient away from the token, instead of inf/NaN.
    """
    if _FINITE.get():
        return lp.exp() * (lp - lq.clamp(min=LOG_Q_FLOOR))
    valid = lp > NEG_INF
    lp0 = torch.where(valid, lp, 0.0)
    lq0 = torch.where(valid, lq, 0.0).clamp(min=LOG_Q_FLOOR)
    return torch.where(valid, lp0.exp() * (lp0 - lq0), 0.0)


def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of log-probs (n, C) -> (n,)."""
    return kl_terms(lp, lq).sum(-1)


def log_mix(la: torch.Tensor, lb: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a, log b, NaN-free where both are -inf (value -inf, gradient 0)."""
    if weight_a >= 1.0:
        return la
    if weight_a <= 0.0:
        return lb
    a = la + torch.log(torch.tensor(weight_a, dtype=la.dtype, device=la.device))
    b = lb + torch.log1p(-torch.tensor(weight_a, dtype=lb.dtype, device=lb.device))
    if _FINITE.get():
        return torch.logaddexp(a, b)
    both = (a == NEG_INF) & (b == NEG_INF)
    mixed = torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b))
    return torch.where(both, NEG_INF, mixed)


def safe_log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log_softmax that returns -inf (not NaN) for rows that are all -inf, with zero gradient there."""
    empty = (x == NEG_INF).all(dim=dim, keepdim=True)
    out = torch.log_softmax(torch.where(empty, 0.0, x), dim=dim)
    return torch.where(empty, NEG_INF, out)


# ------------------------------------------------------------------------------------------ validation, vocab


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def select_tokens(mask: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch idx, seq idx) of counted tokens; mask: (batch, seq) bool/0-1, True = counted, None = all."""
    batch, seq = shape[0], shape[1]
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.bool)
    elif tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch, seq) = {(batch, seq)}")
    b_idx, s_idx = mask.bool().nonzero(as_tuple=True)
    return b_idx, s_idx


def normalise(total: torch.Tensor, count: int, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """Sum over counted tokens / the global count (across grad accumulation and processes) or this call's."""
    if num_items_in_batch is None:
        return total / max(count, 1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ----------------------------------------------------------------------------------------------- buckets


def dense_buckets(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """student: (n, V), teacher: (n, V) logits -> fp32 log-probs at temperature T, both (n, V)."""
    s, t = upcast(student), upcast(teacher.detach())
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)


class _DenseForwardKL(torch.autograd.Function):
    """Per-token KL(teacher || student) of finite dense logits at temperature T: (n, V), (n, V) -> (n,).

    The default loss's hot path with its gradient written by hand, (q - p) / T, and in-place arithmetic: about
    three (n, V) buffers at its peak where autograd through log_softmax, exp, clamp, sub, mul keeps about a dozen. The same value as `kl(lt, ls)` on the finite path (log q floored at LOG_Q_FLOOR).
    """

    @staticmethod
    def forward(ctx, s, t, temperature):  # type: ignore[override]
        x, y = upcast(s), upcast(t)
        if temperature != 1.0:
            x, y = x / temperature, y / temperature
        lt = torch.log_softmax(y, dim=-1)
        p = lt.exp()
        del y
        ls = torch.log_softmax(x, dim=-1)
        floored = bool((ls < LOG_Q_FLOOR).any())
        # sum p (lt - lq) formed in lt's buffer and summed by torch's cascade sum: two separate sums would cancel when
        # the KL is small next to the entropy, and a BLAS dot over 152k terms loses ~1e-4 in fp32
        value = lt.sub_(ls.clamp(min=LOG_Q_FLOOR) if floored else ls).mul_(p).sum(-1)
        del lt
        ctx.save_for_backward(ls, p)
        ctx.temperature, ctx.floored, ctx.dtype = temperature, floored, s.dtype
        return value

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ls, p = ctx.saved_tensors
        scale = (grad / ctx.temperature).to(ls.dtype).unsqueeze(-1)
        if ctx.floored:  # d/ds of -sum p_i max(lq_i, floor): q * (p-mass above the floor) - p above the floor
            above = ls >= LOG_Q_FLOOR
            p = torch.where(above, p, 0.0)
            out = ls.exp().mul_(p.sum(-1, keepdim=True)).sub_(p)
        else:
            out = ls.exp().sub_(p)
        return out.mul_(scale).to(ctx.dtype), None, None


def dense_forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row of finite dense logits (n, V) at temperature T -> (n,) (see _DenseForwardKL)."""
    return _DenseForwardKL.apply(student, teacher.detach(), temperature)


class _TailBuckets(torch.autograd.Function):
    """Student log-probs over the teacher's top-k ids and one tail bucket (every other id), at T = 1.

    s: (n, V) float32/64 logits; ids: (n, k) long, any in-range id at invalid slots; valid: (n, k) bool ->
    (n, k + 1): log p at the valid ids (-inf at the others), then log(mass outside the valid ids), summed over
    those ids directly (no 1 - sum p_topk cancellation). The same values as gathering log_softmax(s) and a
    log-sum-exp over the masked rows, in four passes over the (n, V) rows instead of about twenty (two
    log-sum-exps, the mask, their autograd backwards), and a gradient written in one:
    d ls_j / d s_i = [i = id_j] - p_i, d ls_tail / d s_i = [i outside the top-k] e_i / tail - p_i.
    """

    @staticmethod
    def forward(ctx, s, ids, valid):  # type: ignore[override]
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        z = e.sum(-1, keepdim=True)
        e_top = e.gather(-1, ids)
        covered = torch.zeros(s.shape, dtype=torch.uint8, device=s.device)
        covered.scatter_reduce_(-1, ids, valid.to(torch.uint8), reduce="amax")
        e.masked_fill_(covered.bool(), 0.0)
        del covered
        tail = e.sum(-1, keepdim=True)
        log_z = z.log()
        top = torch.where(valid, s.gather(-1, ids) - m - log_z, NEG_INF)
        ctx.save_for_backward(e, e_top, z, tail, ids, valid)
        return torch.cat([top, tail.log() - log_z], dim=-1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        e, e_top, z, tail, ids, valid = ctx.saved_tensors
        g_top = torch.where(valid, grad[:, :-1], 0.0)
        g_tail = grad[:, -1:]
        g_sum = g_top.sum(-1, keepdim=True) + g_tail
        # ids outside the top-k: e_i * (g_tail / tail - g_sum / z); e is 0 at the top-k ids
        out = e * (torch.where(tail > 0, g_tail / tail, 0.0) - g_sum / z)
        # top-k ids: g_j (summed over slots holding the id) - p_i * g_sum, the p_i term once per distinct id
        same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
        first = valid & ~same.tril(diagonal=-1).any(-1)
        out.scatter_add_(-1, ids, g_top - torch.where(first, e_top / z * g_sum, 0.0))
        return out, None, None


def sparse_buckets(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce both sides to the teacher's support. student: (n, V) logits; ids, logprobs: (n, k); log_tail: (n,).

    renormalize: (n, k) log-probs, each side renormalised over the valid top-k ids (logits / T).
    tail: (n, k + 1) log-probs: the top-k ids and a tail bucket, both taken at T = 1 (the student's tail
    exactly, as log-sum-exp over its non-top-k ids) and then tempered alike as a (k + 1)-way distribution,
    log p / T renormalised. With k = vocab this is exactly the dense loss; for k < vocab at T != 1 the tail is
    tempered as one category (a sparse signal does not say how the tail mass is spread), the same on both sides
    so that equal distributions still give 0.
    """
    s = upcast(student)
    lp = logprobs.detach().to(s.dtype)
    valid = lp > NEG_INF
    ids = torch.where(valid, ids, 0)  # padding slots may hold any id (even -1): never index with them
    gathered = torch.where(valid, s.gather(-1, ids), NEG_INF)
    if mode == "renormalize":
        return (
            safe_log_softmax(gathered / temperature),
            safe_log_softmax(lp / temperature),
        )
    vocab = s.shape[-1]
    has_tail = valid.sum(-1, keepdim=True) < vocab
    t_tail = log_tail.detach().to(s.dtype).unsqueeze(-1)
    t_tail = torch.where(has_tail, t_tail.clamp(min=LOG_TAIL_FLOOR), NEG_INF)
    ls = _TailBuckets.apply(s, ids, valid)
    lt = torch.cat([lp, t_tail], dim=-1)
    if temperature != 1.0:
        ls, lt = ls / temperature, lt / temperature
    return safe_log_softmax(ls), safe_log_softmax(lt)


def teacher_log_tail(signal: SparseSignal) -> torch.Tensor:
    """log of the teacher's mass outside its top-k: the stored tail, else log(1 - sum p_topk) (b, s)."""
    if signal.tail is not None:
        return torch.log(upcast(signal.tail.detach()).clamp(min=0.0))
    lse = torch.logsumexp(upcast(signal.logprobs.detach()), dim=-1).clamp(max=0.0)
    return torch.log1p(-torch.exp(lse))


# ---------------------------------------------------------------------------------------------- reduction


class _ChunkedTokenSum(torch.autograd.Function):
    """Sum of token_fn over counted tokens, `chunk_size` tokens at a time.

    Forward computes each chunk's loss and, when the student needs a gradient, that chunk's gradient at once
    (as Liger's fused losses do), writing it into one buffer shaped like the student logits; the chunk's
    fp32 intermediates are freed before the next chunk. Backward only scales that buffer.
    """

    @staticmethod
    def forward(ctx, student, b_idx, s_idx, vocab, chunk_size, token_fn, payload):  # type: ignore[override]
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student) if needs_grad else None
        total = torch.zeros(
            (),
            dtype=torch.float64 if student.dtype == torch.float64 else torch.float32,
            device=student.device,
        )
        for start in range(0, b_idx.numel(), chunk_size):
            b, s = b_idx[start : start + chunk_size], s_idx[start : start + chunk_size]
            rest = [gather_rows(p, b, s) for p in payload]
            loss, g = chunk_loss(token_fn, student[b, s, :vocab], rest, needs_grad)
            if needs_grad:
                grad[b, s, :vocab] = g
            total += loss
            del rest, loss, g
        ctx.grads = (grad,)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # Scale the stored gradient in place and hand it over (dropping our reference, so autograd can take
        # it as the leaf's .grad without a copy): one tokens x vocab buffer in all, at the price of a single
        # backward pass through this node.
        (grad,) = take_grads(ctx, "chunked loss")
        grad.mul_(grad_out.to(grad.dtype))
        return (grad, None, None, None, None, None, None)


def finish(total: torch.Tensor, count: int, settings: LogitSettings) -> torch.Tensor:
    """Normalise a token sum (global or local count) and scale by T^2 unless turned off."""
    loss = normalise(total, count, settings.num_items_in_batch)
    return loss * settings.temperature**2 if settings.scale_temperature else loss


def token_loss(
    token_fn: TokenFn,
    student_logits: torch.Tensor | LinearLogits,
    payload: tuple[torch.Tensor | LinearLogits, ...],
    mask: torch.Tensor | None,
    vocab: int,
    settings: LogitSettings,
) -> torch.Tensor:
    """The end of every logit loss: token_fn summed over the counted tokens, normalised, T^2.

    student_logits: (batch, seq, vocab_full) logits, or a `LinearLogits` (hidden states + lm_head, projected per
    chunk inside the loss: the fused path); payload: teacher tensors shaped (batch, seq, ...) or LinearLogits,
    indexed with the same tokens; only the first `vocab` student rows are used. Masked tokens are dropped
    before anything is computed on them. Inside `shared_projection()`, a LinearLogits student's loss is deferred
    to the shared pass (which projects each chunk once for all the losses) and a zero placeholder is returned.
    """
    shared = _SHARED.get()
    if shared is not None and isinstance(student_logits, LinearLogits):
        return shared.add(token_fn, student_logits, payload, mask, vocab, settings)
    chunk_size = settings.chunk_size
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    b_idx, s_idx = select_tokens(mask, student_logits.shape)
    b_idx, s_idx = b_idx.to(student_logits.device), s_idx.to(student_logits.device)
    payload = tuple(p.detach() for p in payload)
    if isinstance(student_logits, LinearLogits):
        total = fused_token_sum(token_fn, student_logits.cut(vocab), b_idx, s_idx, payload, chunk_size)
    elif chunk_size is None:
        rows = student_logits[b_idx, s_idx, :vocab]
        total = token_fn(rows, *[gather_rows(p, b_idx, s_idx) for p in payload]).sum()
    else:
        total = _ChunkedTokenSum.apply(student_logits, b_idx, s_idx, vocab, chunk_size, token_fn, payload)
    return finish(total, int(b_idx.numel()), settings)


class SharedProjection:
    """The fused logit losses of one training step, run in one pass that projects each chunk through lm_head once.

    forward_kl + cross_entropy (the default recipe) would otherwise project the student's counted tokens twice
    (and an online teacher's twice). Losses called inside `with shared_projection() as shared:` register their
    per-token function (`add`) under the current `component(key, weight)` and return 0; `run()` then returns the
    weighted total (with gradient) and each component's value (detached, for logging).
    """

    def __init__(self) -> None:
        # (student, term, counted (batch, seq) mask, component key, component weight, chunk_size)
        self._terms: list[tuple[LinearLogits, Term, torch.Tensor, object, float, int | None]] = []
        self._key: object = None
        self._weight = 1.0
        self._scale = 1.0

    @contextlib.contextmanager
    def _using(self, **state: object) -> Iterator[None]:
        saved = {name: getattr(self, name) for name in state}
        self.__dict__.update(state)
        try:
            yield
        finally:
            self.__dict__.update(saved)

    def component(self, key: object, weight: float = 1.0) -> contextlib.AbstractContextManager[None]:
        """Losses called in here count towards component `key`, weighted by `weight` in the total."""
        return self._using(_key=key, _weight=weight)

    def scaled(self, factor: float) -> contextlib.AbstractContextManager[None]:
        """Losses called in here are multiplied by `factor`, in the component's value too (per-example weights)."""
        return self._using(_scale=self._scale * factor)

    def add(self, token_fn: TokenFn, student: LinearLogits, payload: tuple, mask: torch.Tensor | None, vocab: int,
            settings: LogitSettings) -> torch.Tensor:  # fmt: skip
        if settings.chunk_size is not None and settings.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {settings.chunk_size}")
        b_idx, _ = select_tokens(mask, student.shape)
        counted = torch.zeros(student.shape[:2], dtype=torch.bool, device=student.device)
        if mask is None:
            counted[:] = True
        else:
            counted |= mask.bool().to(student.device)
        scale = finish(torch.ones((), device=student.device), int(b_idx.numel()), settings) * self._scale
        payload = tuple(p.detach() for p in payload)
        term = Term(token_fn, payload, None, vocab, scale)
        self._terms.append((student, term, counted, self._key, self._weight, settings.chunk_size))
        return torch.zeros((), device=student.device)

    def run(self) -> tuple[torch.Tensor | None, dict]:
        """(weighted total of the deferred losses, with gradient, or None when there were none;
        {component key: its deferred value, detached})."""
        total, values = None, {}
        groups: dict[tuple, list] = {}
        for entry in self._terms:
            student = entry[0]
            groups.setdefault((id(student.hidden), id(student.weight), id(student.bias), entry[5]), []).append(entry)
        for entries in groups.values():
            student, chunk_size = entries[0][0], entries[0][5]
            union = torch.zeros_like(entries[0][2])
            for _, _, counted, *_ in entries:
                union |= counted
            b_idx, s_idx = union.nonzero(as_tuple=True)
            terms = []
            for _, term, counted, _, weight, _ in entries:
                member = counted[b_idx, s_idx]
                terms.append(Term(term.token_fn, term.payload, None if bool(member.all()) else member, term.vocab,
                                  term.coef * weight))  # fmt: skip
            part, sums = fused_terms(student, b_idx, s_idx, terms, chunk_size)
            total = part if total is None else total + part
            for (_, term, _, key, _, _), value in zip(entries, sums):
                values[key] = values.get(key, 0.0) + (term.coef * value).detach()
        self._terms.clear()
        return total, values


_SHARED: contextvars.ContextVar[SharedProjection | None] = contextvars.ContextVar("distill_shared", default=None)


@contextlib.contextmanager
def shared_scale(factor: float) -> Iterator[None]:
    """Inside shared_projection(): the deferred losses called in here count `factor` times (a caller that
    multiplies a loss's returned value by `factor` gets 0 x factor from the placeholder); outside: nothing."""
    shared = _SHARED.get()
    if shared is None:
        yield
        return
    with shared.scaled(factor):
        yield


@contextlib.contextmanager
def shared_projection() -> Iterator[SharedProjection]:
    """Defer the fused logit losses called inside to one shared pass (see SharedProjection)."""
    shared = SharedProjection()
    token = _SHARED.set(shared)
    try:
        yield shared
    finally:
        _SHARED.reset(token)


def divergence_loss(
    divergence: Divergence,
    student_logits: torch.Tensor | LinearLogits,
    teacher: torch.Tensor | LinearLogits | SparseSignal,
    mask: torch.Tensor | None,
    settings: LogitSettings,
    dense: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The shared body of every logit divergence: buckets per teacher shape, token sum, normalise, T^2.

    student_logits: (batch, seq, vocab) logits or LinearLogits; teacher: dense (batch, seq, vocab_t) logits (or
    LinearLogits) or a SparseSignal with (batch, seq, k) ids/logprobs; mask: (batch, seq). Returns a scalar.
    """
    temperature, sparse_mode, vocab_size = settings.temperature, settings.sparse_mode, settings.vocab_size
    check_temperature(temperature)
    if student_logits.dim() != 3:
        raise ValueError(
            f"student_logits must be (batch, seq, vocab), got shape {tuple(student_logits.shape)}"
        )
    lead = tuple(student_logits.shape[:2])
    if isinstance(teacher, SparseSignal):
        if sparse_mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {sparse_mode!r}")
        if tuple(teacher.ids.shape[:2]) != lead or teacher.ids.shape != teacher.logprobs.shape:
            raise ValueError(
                f"sparse teacher ids {tuple(teacher.ids.shape)} / logprobs {tuple(teacher.logprobs.shape)} "
                f"do not match the student's (batch, seq) = {lead}"
            )
        if sparse_mode == "renormalize" and teacher.k == 1:
            raise ValueError(
                "sparse_mode='renormalize' with a top-1 teacher renormalises both sides to probability 1 and "
                "gives a zero loss; use sparse_mode='tail' (keeps the mass outside the top-k) or cross_entropy"
            )
        vocab = student_vocab(student_logits, vocab_size)
        check_sparse_ids(teacher, vocab)
        payload = (teacher.ids, teacher.logprobs, teacher_log_tail(teacher))

        def token_fn(s, ids, lp, lt_tail):
            return divergence(*sparse_buckets(s, ids, lp, lt_tail, temperature, sparse_mode))

    elif isinstance(teacher, LinearLogits) or (isinstance(teacher, torch.Tensor) and teacher.is_floating_point()):
        if teacher.dim() != 3 or tuple(teacher.shape[:2]) != lead:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher.shape)}, expected (batch, seq, vocab) with "
                f"(batch, seq) = {lead}"
            )
        vocab = common_vocab(student_logits.shape[-1], teacher.shape[-1], vocab_size)
        payload = (cut_vocab(teacher, vocab),)

        def token_fn(s, t):
            # One finiteness check of the teacher rows instead of guards in every kl / log_mix pass. The student
            # rows are model logits of counted tokens (finite unless training already diverged).
            # (the sum of finite logits is finite, short of ~1e38; inf, -inf and NaN all make it non-finite)
            finite = bool(torch.isfinite(t.sum()))
            if finite and dense is not None:
                return dense(s, t, temperature)
            with assume_finite(finite):
                return divergence(*dense_buckets(s, t, temperature))

    else:
        raise TypeError(
            f"teacher must be dense float logits or a SparseSignal, got {type(teacher).__name__}"
            + (f" of dtype {teacher.dtype}" if isinstance(teacher, torch.Tensor) else "")
        )
    return token_loss(token_fn, student_logits, payload, mask, vocab, settings)


def divergence(
    name: str,
    params: type[LossParams | NoParams] = NoParams,
    dense: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> Callable[[Divergence], Callable]:
    """Register a per-token divergence `formula(ls, lt, **params) -> (n,)` over log-probs (student, teacher) as
    the logit loss `name` (dense and sparse teachers); returns the public loss function. `dense(student rows,
    teacher rows, T) -> (n,)`: the same value on finite dense logits, computed faster (a hand-written gradient)."""

    def wrap(formula: Callable[..., torch.Tensor]) -> Callable:
        def body(student_logits, teacher, mask, settings: LogitSettings, **p):
            return divergence_loss(lambda ls, lt: formula(ls, lt, **p), student_logits, teacher, mask, settings,
                                   dense)  # fmt: skip

        body.__doc__, body.__module__ = formula.__doc__, formula.__module__
        return logit_loss(name, params=params)(body)

    return wrap
