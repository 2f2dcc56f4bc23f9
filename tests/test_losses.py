"""distill.losses: analytic identities, masking, normalisation, temperature, sparse signals, chunking, vocab
alignment, tokenizer checks, hidden-state losses and parity with TRL's generalized_jsd_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    HIDDEN_LOSSES,
    LOSSES,
    VocabMismatchError,
    align_vocab,
    check_tokenizers,
    cross_entropy,
    default_layer_map,
    forward_kl,
    hidden_state_loss,
    jsd,
    make_projections,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)
from distill.signals import SparseSignal

B, S, V = 2, 5, 13
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
LOGIT_LOSSES = DIVERGENCES + ["cross_entropy"]


def logits(seed: int, *shape: int, dtype=torch.float32, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def sparse_from(teacher: torch.Tensor, k: int, shuffle: bool = False, with_tail: bool = True) -> SparseSignal:
    """Top-k of dense teacher logits at T=1; shuffle permutes the slots (order must not matter)."""
    lp = torch.log_softmax(teacher.double(), -1)
    vals, ids = lp.topk(k, dim=-1)
    if shuffle:
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(7))
        vals, ids = vals[..., perm], ids[..., perm]
    tail = (1 - vals.exp().sum(-1)).clamp(min=0) if with_tail else None
    return SparseSignal(ids, vals.to(teacher.dtype), None if tail is None else tail.to(teacher.dtype))


def a_mask(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, S, generator=g) > 0.4
    mask[0, 0] = True
    mask[1, -1] = False
    return mask


def grad_of(fn, student: torch.Tensor, *args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad


# --------------------------------------------------------------------------------------------- registry


def test_registry_names_and_hidden_set():
    for name in DIVERGENCES + ["cross_entropy", "hidden_mse", "hidden_cosine"]:
        assert callable(LOSSES[name])
    assert HIDDEN_LOSSES <= set(LOSSES)
    assert HIDDEN_LOSSES == {"hidden_mse", "hidden_cosine"}


def test_config_validation_uses_registry():
    from distill.config import TrainConfig

    assert TrainConfig(losses=[{"name": "jsd", "params": {"beta": 0.3}}]).losses[0].name == "jsd"
    with pytest.raises(ValueError, match="unknown loss"):
        TrainConfig(losses=[{"name": "forward_kll"}])


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_common_call_shape(name):
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    out = LOSSES[name](s, t, a_mask(), temperature=1.5, scale_temperature=False, num_items_in_batch=4,
                       sparse_mode="tail", chunk_size=3, vocab_size=V)  # fmt: skip
    assert out.shape == () and torch.isfinite(out)


def test_unknown_param_is_an_error():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    with pytest.raises(TypeError):
        forward_kl(s, t, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="sparse_mode"):
        forward_kl(s, sparse_from(t, 3), sparse_mode="other")


# --------------------------------------------------------------------------------------- analytic identities


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identical_inputs_give_zero(name, temperature):
    t = logits(1, B, S, V)
    fn = LOSSES[name]
    assert abs(fn(t.clone(), t, temperature=temperature).item()) < 1e-6
    for mode in ("tail", "renormalize"):
        out = fn(t.clone(), sparse_from(t, 4), sparse_mode=mode, temperature=temperature)
        assert abs(out.item()) < 1e-5, (mode, out)
    # and different inputs do not
    assert fn(logits(0, B, S, V), t, temperature=temperature).item() > 1e-3


def test_jsd_ends_are_the_two_kls():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    m = a_mask()
    torch.testing.assert_close(jsd(s, t, m, beta=0.0), forward_kl(s, t, m))
    torch.testing.assert_close(jsd(s, t, m, beta=1.0), reverse_kl(s, t, m))
    sig = sparse_from(t, 4)
    torch.testing.assert_close(jsd(s, sig, m, beta=0.0), forward_kl(s, sig, m))
    torch.testing.assert_close(jsd(s, sig, m, beta=1.0), reverse_kl(s, sig, m))
    assert not torch.allclose(forward_kl(s, t, m), reverse_kl(s, t, m))


def test_jsd_symmetric_at_half_and_bounded():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5))
    assert 0 < jsd(s, t, beta=0.5).item() <= math.log(2)
    assert not torch.allclose(jsd(s, t, beta=0.2), jsd(t, s, beta=0.2))


def test_skew_kls_at_alpha_zero_and_one():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert skew_forward_kl(s, t, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert 0 < skew_forward_kl(s, t, alpha=0.1).item() < forward_kl(s, t).item()


def test_skew_kl_matches_formula():
    s, t = logits(0, 1, 1, V), logits(1, 1, 1, V)
    p, q = t.softmax(-1), s.softmax(-1)
    expect_f = (p * (p.log() - (0.3 * p + 0.7 * q).log())).sum()
    expect_r = (q * (q.log() - (0.3 * q + 0.7 * p).log())).sum()
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.3), expect_f)
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.3), expect_r)


def test_forward_kl_and_tvd_match_formula():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    p, q = t.softmax(-1), s.softmax(-1)
    torch.testing.assert_close(forward_kl(s, t), (p * (p.log() - q.log())).sum(-1).mean())
    torch.testing.assert_close(LOSSES["tvd"](s, t), 0.5 * (p - q).abs().sum(-1).mean())


# ----------------------------------------------------------------------------------------------- sparse


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_with_full_vocab_equals_dense(name, mode, temperature):
    s, t = logits(0, B, S, V, dtype=torch.float64), logits(1, B, S, V, dtype=torch.float64)
    m = a_mask()
    fn = LOSSES[name]
    dense_val, dense_grad = grad_of(fn, s, t, m, temperature=temperature)
    for with_tail in (True, False):
        sig = sparse_from(t, V, shuffle=True, with_tail=with_tail)
        val, grad = grad_of(fn, s, sig, m, temperature=temperature, sparse_mode=mode)
        torch.testing.assert_close(val, dense_val, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(grad, dense_grad, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_top1_is_never_a_silent_zero(name):
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    sig = sparse_from(t, 1)
    out = LOSSES[name](s, sig, sparse_mode="tail")
    assert out.item() > 1e-4
    with pytest.raises(ValueError, match="top-1"):
        LOSSES[name](s, sig, sparse_mode="renormalize")
    # a teacher certain of its top-1 (tail 0): still > 0 and finite for every divergence, reverse ones included
    certain = SparseSignal(sig.ids, torch.zeros_like(sig.logprobs), torch.zeros(B, S))
    out = LOSSES[name](s, certain, sparse_mode="tail")
    assert torch.isfinite(out) and out.item() > 1e-4


def test_sparse_tail_buckets_match_hand_computation():
    s, t = logits(0, 1, 1, V), logits(1, 1, 1, V)
    sig = sparse_from(t, 3)
    q = s.softmax(-1)[0, 0]
    p_top = sig.logprobs.exp()[0, 0]
    q_top = q[sig.ids[0, 0]]
    p_b = torch.cat([p_top, 1 - p_top.sum(0, keepdim=True)])
    q_b = torch.cat([q_top, 1 - q_top.sum(0, keepdim=True)])
    torch.testing.assert_close(
        forward_kl(s, sig), (p_b * (p_b.log() - q_b.log())).sum(), rtol=1e-5, atol=1e-6
    )
    # renormalize: both sides over the top-3 only
    p_r, q_r = p_top / p_top.sum(), q_top / q_top.sum()
    torch.testing.assert_close(forward_kl(s, sig, sparse_mode="renormalize"), (p_r * (p_r / q_r).log()).sum())


def test_sparse_stored_tail_equals_computed_tail_and_padding_slots():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    sig = sparse_from(t, 4)
    no_tail = SparseSignal(sig.ids, sig.logprobs, None)
    torch.testing.assert_close(forward_kl(s, sig), forward_kl(s, no_tail), rtol=1e-5, atol=1e-6)
    # padding slots (logprob -inf, any id, even -1 or a duplicate) change nothing
    ids = torch.cat([sig.ids, torch.full((B, S, 1), -1), sig.ids[..., :1]], -1)
    lps = torch.cat([sig.logprobs, torch.full((B, S, 2), float("-inf"))], -1)
    padded = SparseSignal(ids, lps, sig.tail)
    for mode in ("tail", "renormalize"):
        val, grad = grad_of(reverse_kl, s, padded, sparse_mode=mode)
        ref_val, ref_grad = grad_of(reverse_kl, s, sig, sparse_mode=mode)
        torch.testing.assert_close(val, ref_val)
        torch.testing.assert_close(grad, ref_grad)


def test_sparse_ids_outside_student_vocab_are_refused():
    s, t = logits(0, B, S, V), logits(1, B, S, V + 4)
    sig = sparse_from(t, V + 4)
    with pytest.raises(VocabMismatchError, match="outside the student vocabulary"):
        forward_kl(s, sig)


# ------------------------------------------------------------------------------------------------ masking


def _garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill masked positions with inf, -inf, huge and NaN values."""
    x = x.clone()
    bad = torch.tensor([float("inf"), float("-inf"), 1e30, float("nan")], dtype=x.dtype)
    x[~mask] = bad.repeat(V // 4 + 1)[: x.shape[-1]]
    return x


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("teacher_kind", ["dense", "tail", "renormalize"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_masked_garbage_changes_nothing_and_stays_finite(name, teacher_kind, chunk_size):
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    m = a_mask()
    fn = LOSSES[name]
    mode = "tail" if teacher_kind == "dense" else teacher_kind
    if teacher_kind == "dense":
        clean_t, dirty_t = t, _garbage(t, m)
    else:
        clean_t = sparse_from(t, 4)
        dirty_t = SparseSignal(clean_t.ids.clone(), clean_t.logprobs.clone(), clean_t.tail.clone())
        dirty_t.logprobs[~m] = float("-inf")
        dirty_t.ids[~m] = -7
        dirty_t.tail[~m] = float("nan")
    kw = {"sparse_mode": mode, "chunk_size": chunk_size}
    ref_val, ref_grad = grad_of(fn, s, clean_t, m, **kw)
    val, grad = grad_of(fn, _garbage(s, m), dirty_t, m, **kw)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    torch.testing.assert_close(val, ref_val)
    torch.testing.assert_close(grad, ref_grad)
    assert (grad[~m] == 0).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_minus_inf_teacher_logits_at_counted_positions(name):
    """A teacher that bans tokens (-inf logits) must not produce NaN for any divergence."""
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    t[..., :3] = float("-inf")
    val, grad = grad_of(LOSSES[name], s, t)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    if name in ("reverse_kl", "skew_reverse_kl"):  # mass on banned tokens is pushed away hard
        assert (grad[..., :3] > 0).all()


def test_fully_masked_batch_gives_zero_with_grad_path():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    for chunk in (None, 2):
        val, grad = grad_of(forward_kl, s, t, torch.zeros(B, S, dtype=torch.bool), chunk_size=chunk)
        assert val.item() == 0.0 and (grad == 0).all()


def test_mask_shape_is_checked():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    with pytest.raises(ValueError, match="mask has shape"):
        forward_kl(s, t, torch.ones(B, S + 1, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_num_items_in_batch_makes_micro_batches_add_up(name):
    s, t = logits(0, 4, S, V), logits(1, 4, S, V)
    m = torch.rand(4, S, generator=torch.Generator().manual_seed(5)) > 0.3
    m[2:] &= torch.tensor([True, False, False, True, False])  # unequal counts per micro-batch
    fn = LOSSES[name]
    whole_val, whole_grad = grad_of(fn, s, t, m)
    n = int(m.sum())
    a_val, a_grad = grad_of(fn, s[:2], t[:2], m[:2], num_items_in_batch=n)
    b_val, b_grad = grad_of(fn, s[2:], t[2:], m[2:], num_items_in_batch=torch.tensor(n))
    torch.testing.assert_close(a_val + b_val, whole_val)
    torch.testing.assert_close(torch.cat([a_grad, b_grad]), whole_grad)
    # a per-micro-batch mean would differ here (counts are unequal)
    assert not torch.allclose((fn(s[:2], t[:2], m[:2]) + fn(s[2:], t[2:], m[2:])) / 2, whole_val)


# -------------------------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("name", DIVERGENCES)
def test_temperature_both_sides_and_t_squared_switch(name):
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    fn = LOSSES[name]
    on = fn(s, t, temperature=2.0)
    off = fn(s, t, temperature=2.0, scale_temperature=False)
    torch.testing.assert_close(on, 4.0 * off)
    # T applies to both sides: same as T = 1 on logits divided by T
    torch.testing.assert_close(off, fn(s / 2.0, t / 2.0))
    assert not torch.allclose(off, fn(s, t))


def test_temperature_on_sparse_tail_tempers_both_sides_alike():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    sig = sparse_from(t, 4)
    on = forward_kl(s, sig, temperature=3.0)
    torch.testing.assert_close(on, 9.0 * forward_kl(s, sig, temperature=3.0, scale_temperature=False))
    assert not torch.allclose(on, forward_kl(s, sig) * 9.0)


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_gradcheck_float64(name):
    s = logits(0, 1, 3, 6, dtype=torch.float64).requires_grad_(True)
    t = logits(1, 1, 3, 6, dtype=torch.float64)
    m = torch.tensor([[True, False, True]])
    fn = LOSSES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, t, m, temperature=1.7), (s,))
    assert torch.autograd.gradcheck(lambda x: fn(x, sparse_from(t, 3), m, temperature=1.7), (s,))
    assert torch.autograd.gradcheck(lambda x: fn(x, sparse_from(t, 3), m, sparse_mode="renormalize"), (s,))


def test_bf16_student_is_computed_in_fp32():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    ref = forward_kl(s.bfloat16().float(), t.bfloat16().float())
    out = forward_kl(s.bfloat16().requires_grad_(True), t.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------------ chunking


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("teacher_kind", ["dense", "tail", "renormalize"])
@pytest.mark.parametrize("chunk_size", [2, 1000])
def test_chunked_equals_plain(name, teacher_kind, chunk_size):
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    m = a_mask()
    teacher = t if teacher_kind == "dense" else sparse_from(t, 4)
    mode = "tail" if teacher_kind == "dense" else teacher_kind
    fn = LOSSES[name]
    kw = {"temperature": 1.5, "sparse_mode": mode, "num_items_in_batch": 7}
    plain_val, plain_grad = grad_of(fn, s, teacher, m, **kw)
    chunk_val, chunk_grad = grad_of(fn, s, teacher, m, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(chunk_val, plain_val, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_on_labels_equals_plain():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    labels = t.argmax(-1).masked_fill(~a_mask(), -100)
    plain_val, plain_grad = grad_of(cross_entropy, s, labels)
    chunk_val, chunk_grad = grad_of(cross_entropy, s, labels, chunk_size=1)
    torch.testing.assert_close(chunk_val, plain_val, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk_grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_chunked_gradient_is_scaled_by_upstream_and_works_without_grad():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    x = s.clone().requires_grad_(True)
    (0.25 * forward_kl(x, t, chunk_size=3)).backward()
    _, ref = grad_of(lambda y, z: 0.25 * forward_kl(y, z), s, t)
    torch.testing.assert_close(x.grad, ref)
    with torch.no_grad():
        torch.testing.assert_close(forward_kl(s, t, chunk_size=3), forward_kl(s, t))
    # one backward pass: a second one through the same graph is a clear error, not a wrong gradient
    x = s.clone().requires_grad_(True)
    loss = forward_kl(x, t, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


# ------------------------------------------------------------------------------------------- vocabularies


def test_padded_vocab_rows_are_cut():
    s, t = logits(0, B, S, V), logits(1, B, S, V + 3)
    t_garbage = t.clone()
    t_garbage[..., V:] = 50.0  # padded rows hold nonsense; they must not count
    torch.testing.assert_close(forward_kl(s, t_garbage), forward_kl(s, t[..., :V]))
    # vocab_size = the tokenizer's size cuts both sides
    s_pad = torch.cat([s, torch.full((B, S, 2), 40.0)], -1)
    torch.testing.assert_close(forward_kl(s_pad, t_garbage, vocab_size=V), forward_kl(s, t[..., :V]))
    torch.testing.assert_close(
        forward_kl(s_pad, t_garbage, vocab_size=V, chunk_size=2), forward_kl(s, t[..., :V])
    )
    torch.testing.assert_close(
        forward_kl(s_pad, sparse_from(t[..., :V], 4), vocab_size=V), forward_kl(s, sparse_from(t[..., :V], 4))
    )
    _, grad = grad_of(forward_kl, s_pad, t_garbage, vocab_size=V, chunk_size=2)
    assert (grad[..., V:] == 0).all()
    a, b = align_vocab(s_pad, t_garbage)
    assert a.shape[-1] == b.shape[-1] == V + 2
    a, b = align_vocab(s_pad, t_garbage, vocab_size=V)
    assert a.shape[-1] == b.shape[-1] == V and a.data_ptr() == s_pad.data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match="vocab_size"):
        align_vocab(s, t, vocab_size=V + 10)


class _Tok:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_check_tokenizers_compares_vocabularies():
    base = {f"tok{i}": i for i in range(10)}
    check_tokenizers(_Tok(base), _Tok(dict(base)))
    swapped = dict(base, tok1=2, tok2=1)  # same size, different ids
    with pytest.raises(VocabMismatchError, match="different vocabularies") as info:
        check_tokenizers(_Tok(swapped), _Tok(base))
    assert "tok1" in str(info.value) and "ULD" in str(info.value)
    extra = dict(base, hello=10)
    with pytest.raises(VocabMismatchError, match="only in the teacher.*hello"):
        check_tokenizers(_Tok(base), _Tok(extra))
    assert issubclass(VocabMismatchError, ValueError)


def test_check_tokenizers_on_real_tokenizers():
    from conftest import make_tokenizer

    a, b = make_tokenizer(300), make_tokenizer(300)
    check_tokenizers(a, b)
    with pytest.raises(VocabMismatchError, match="cross-tokenizer distillation"):
        check_tokenizers(make_tokenizer(280), a)


# ---------------------------------------------------------------------------------------- cross-entropy


def test_cross_entropy_on_labels_teacher_argmax_and_top1():
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    labels = t.argmax(-1)
    labels[0, :2] = -100
    ref = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(s, labels), ref)
    m = labels != -100
    torch.testing.assert_close(cross_entropy(s, t, m), ref)
    torch.testing.assert_close(cross_entropy(s, sparse_from(t, 3, shuffle=True), m), ref)
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        cross_entropy(s, torch.full((B, S), V + 1))


# -------------------------------------------------------------------------------------------- hidden states


def _hidden(seed: int, n: int, d: int) -> list[torch.Tensor]:
    return [logits(seed + i, B, S, d, scale=1.0) for i in range(n)]


def test_default_layer_map_even_first_and_last():
    assert default_layer_map(3, 7) == [(0, 0), (1, 3), (2, 6)]
    assert default_layer_map(1, 5) == [(0, 4)]
    assert default_layer_map(5, 13)[-1] == (4, 12)


def test_hidden_losses_identities_mask_and_layer_map():
    th = _hidden(0, 5, 8)
    sh = [th[0], th[2], th[4]]  # what the default map 3 -> 5 picks
    m = a_mask()
    assert hidden_state_loss(sh, th, m).item() == pytest.approx(0.0, abs=1e-7)
    assert hidden_state_loss([2 * h for h in sh], th, m, kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss([2 * h for h in sh], th, m, kind="mse").item() > 0.1
    # explicit map changes which layers are compared
    assert hidden_state_loss(sh, th, m, layer_map=[(1, 1)]).item() > 0.1
    torch.testing.assert_close(
        hidden_state_loss(sh, th, m, layer_map=[(1, 1)]),
        ((sh[1] - th[1]).pow(2).mean(-1)[m]).mean(),
    )
    # masked positions with garbage change nothing
    dirty = [h.clone() for h in sh]
    for h in dirty:
        h[~m] = float("nan")
    ref = hidden_state_loss([x + 0.1 for x in sh], th, m)
    torch.testing.assert_close(hidden_state_loss([x + 0.1 for x in dirty], th, m), ref)
    # registry entries take hidden states and accept (ignore) the logit keywords
    torch.testing.assert_close(LOSSES["hidden_mse"]([x + 0.1 for x in sh], th, m, temperature=2.0), ref)
    torch.testing.assert_close(
        LOSSES["hidden_cosine"](sh, th, m, num_items_in_batch=3),
        hidden_state_loss(sh, th, m, kind="cosine", num_items_in_batch=3),
    )


def test_hidden_projection_needed_and_trained():
    th, sh = _hidden(0, 3, 8), _hidden(10, 2, 4)
    with pytest.raises(ValueError, match="make_projections"):
        hidden_state_loss(sh, th)
    proj = make_projections(4, 8, 2)
    with pytest.raises(ValueError, match="one per pair"):
        hidden_state_loss(sh, th, projections=proj[:1])
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        loss = hidden_state_loss(sh, th, projections=proj, kind="mse")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    assert all(p.grad is not None for p in proj.parameters())


# -------------------------------------------------------------------------------------------- TRL parity


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_parity_with_trl_generalized_jsd_loss(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd")
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss
    s, t = logits(0, B, S, V), logits(1, B, S, V)
    m = a_mask()
    labels = torch.where(m, 1, -100)
    ours = jsd(
        s, t, m, beta=beta, temperature=temperature, scale_temperature=False
    )  # TRL does not scale by T^2
    theirs = trl_loss(s, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # unmasked, with the global-count reduction
    n = B * S
    ours = jsd(s, t, beta=beta, temperature=temperature, scale_temperature=False, num_items_in_batch=n)
    theirs = trl_loss(s, t, beta=beta, temperature=temperature, num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_finite_fast_path_equals_guarded_formulas():
    """Dense finite logits skip the NaN guards; the plain formulas must give the same values and gradients."""
    from distill.losses.common import assume_finite, kl, log_mix

    torch.manual_seed(0)
    s = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 50, dtype=torch.float64) * 30  # sharp: log q below the floor in places
    results = []
    for flag in (False, True):
        with assume_finite(flag):
            ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            value = kl(lt, ls).sum() + kl(ls, log_mix(ls, lt, 0.3)).sum() + kl(lt, log_mix(lt, ls, 0.5)).sum()
        (grad,) = torch.autograd.grad(value, s)
        results.append((value.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_tail_buckets_equal_masked_logsumexp_with_duplicate_and_padding_ids():
    """The sparse tail buckets' hand-written gradient (common._TailBuckets, issue 20) equals autograd through
    the plain formula (log_softmax gathered at the top-k, log-sum-exp over the other ids), with a duplicated id,
    padding slots (-inf logprob, id -1 or a real id) and a row whose top-k covers the whole vocabulary."""
    from distill.losses.common import _TailBuckets

    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    ids = torch.tensor([[1, 4, 1], [0, 2, 5], [3, 0, 0], [0, 1, 2]])
    valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])
    s4 = s.clone()
    s_full = torch.randn(1, 3, generator=g, dtype=torch.float64)  # a 3-id vocabulary covered by its top-3

    def reference(x, ids, valid):
        safe = torch.where(valid, ids, 0)
        lse = torch.logsumexp(x, -1, keepdim=True)
        covered = torch.zeros(x.shape, dtype=torch.bool).scatter(-1, torch.where(valid, safe, safe[:, :1]), True)
        covered &= valid.any(-1, keepdim=True)
        top = torch.where(valid, x.gather(-1, safe) - lse, float("-inf"))
        return torch.cat([top, torch.logsumexp(torch.where(covered, float("-inf"), x), -1, keepdim=True) - lse], -1)

    weights = torch.randn(4, 4, generator=g, dtype=torch.float64)
    for x, i, v, w in ((s4, ids, valid, weights), (s_full, torch.tensor([[2, 0, 1]]), torch.ones(1, 3, dtype=torch.bool),
                                                   weights[:1])):  # fmt: skip
        got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got, want = _TailBuckets.apply(got_x, torch.where(v, i, 0), v), reference(want_x, i, v)
        torch.testing.assert_close(got, want)
        finite = torch.isfinite(want)
        (torch.where(finite, got, 0.0) * w).sum().backward()
        (torch.where(finite, want, 0.0) * w).sum().backward()
        torch.testing.assert_close(got_x.grad, want_x.grad)


@pytest.mark.parametrize("spread", [1.0, 80.0])  # 80: log q below LOG_Q_FLOOR at some ids (the floor's branch)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_dense_forward_kl_equals_autograd_through_the_formula(spread, temperature):
    """forward_kl's hand-written dense gradient (common._DenseForwardKL, issue 20) equals autograd through
    kl(lt, ls) on log_softmax'd rows, with and without log q under the floor."""
    from distill.losses.common import assume_finite, dense_buckets, dense_forward_kl, kl

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(5, 40, generator=g, dtype=torch.float64) * spread).requires_grad_(True)
    t = torch.randn(5, 40, generator=g, dtype=torch.float64) * 3
    w = torch.randn(5, generator=g, dtype=torch.float64)
    got = dense_forward_kl(s, t, temperature)
    (got * w).sum().backward()
    got_grad, s.grad = s.grad, None
    with assume_finite(True):
        ls, lt = dense_buckets(s, t, temperature)
        want = kl(lt, ls)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, s.grad)
    if spread > 1:
        assert bool((ls < -100).any())


def test_dense_forward_kl_keeps_fp32_precision_at_large_vocabularies():
    """Summed over a 60k vocabulary in fp32, the hand-written forward KL stays as close to fp64 as the plain formula
    (a BLAS dot of p with the log-ratio lost ~1e-4 at 152k)."""
    from distill.losses.common import dense_forward_kl

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 60_000, generator=g), torch.randn(4, 60_000, generator=g) * 1.5
    ref = dense_forward_kl(s.double(), t.double(), 1.0)
    torch.testing.assert_close(dense_forward_kl(s, t, 1.0).double(), ref, rtol=1e-5, atol=0)
