"""The fused linear path (distill.losses.fused): logits projected chunk by chunk inside the loss equal the plain
path (project first, then the loss) in value and in the gradients of hidden states, lm_head weight and bias, for
every logit loss, both teacher shapes, temperature, tail / renormalise, padded vocabulary rows and global-token
normalisation; the trainer uses it by default with chunking, and never builds a (tokens x vocab) tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama
from torch.utils._python_dispatch import TorchDispatchMode

from distill.losses import LOSSES, LinearLogits
from distill.losses.fused import forward_unprojected, output_head
from distill.signals import SparseSignal
from distill.training.trainer import LossSpec

B, S, D, DT, V, PAD = 2, 7, 12, 10, 29, 3  # student width D, teacher width DT, true vocab V, padding rows PAD
SAME_TOKENIZER = [n for n, e in LOSSES.items() if e.student == "logits" and e.teacher in ("signal", "labels")]
CROSS = [n for n, e in LOSSES.items() if e.teacher == "tokenizer"]


def rand(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def student_parts(bias: bool = True):
    return rand(0, B, S, D), rand(1, V + PAD, D, scale=0.8), rand(2, V + PAD) if bias else None


def teacher_logits() -> LinearLogits:
    return LinearLogits(rand(3, B, S, DT), rand(4, V + 1, DT, scale=1.2), rand(5, V + 1))


def a_mask() -> torch.Tensor:
    mask = rand(6, B, S) > -0.5
    mask[0, 0], mask[1, -1] = True, False
    return mask


def sparse_from(logits: torch.Tensor, k: int) -> SparseSignal:
    lp = torch.log_softmax(logits[..., :V].double(), -1)
    vals, ids = lp.topk(k, dim=-1)
    return SparseSignal(ids, vals.float(), (1 - vals.exp().sum(-1)).clamp(min=0).float())


def run(fn, teacher, fused: bool, bias: bool = True, **kw):
    """Value and gradients (hidden, weight, bias) of fn on the fused or the plain path."""
    h, w, b = (None if x is None else x.clone().requires_grad_(True) for x in student_parts(bias))
    student = LinearLogits(h, w, b) if fused else F.linear(h, w, b)
    value = fn(student, teacher, a_mask(), **kw)
    value.backward()
    return value.detach(), [x.grad for x in (h, w, b) if x is not None]


def assert_same(fused, plain):
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for g_fused, g_plain in zip(fused[1], plain[1]):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-5)


TEACHERS = ["dense", "dense_linear", "sparse_tail", "sparse_renormalize"]


def teacher_of(kind: str):
    lin = teacher_logits()
    dense = lin.materialise()
    if kind == "dense":
        return dense, {}
    if kind == "dense_linear":  # an online teacher's hidden states + lm_head, projected per chunk too
        return lin, {}
    return sparse_from(dense, 5), {"sparse_mode": kind.split("_")[1]}


@pytest.mark.parametrize("name", SAME_TOKENIZER)
@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_equals_plain(name, kind, temperature):
    teacher, kw = teacher_of(kind)
    kw.update(temperature=temperature, vocab_size=V, num_items_in_batch=11)
    plain = run(LOSSES[name], teacher_of(kind)[0] if kind != "dense_linear" else teacher.materialise(), False,
                chunk_size=None, **kw)  # fmt: skip
    for chunk in (3, 1000):
        assert_same(run(LOSSES[name], teacher, True, chunk_size=chunk, **kw), plain)


@pytest.mark.parametrize("name", ["forward_kl", "cross_entropy"])
def test_fused_without_bias_and_without_vocab_cut(name):
    teacher = teacher_logits().materialise()[..., :V]
    plain = run(LOSSES[name], teacher, False, bias=False)
    assert_same(run(LOSSES[name], teacher, True, bias=False, chunk_size=4), plain)
    if name == "forward_kl":  # rows past the teacher's vocabulary are cut: no gradient on either path
        assert plain[1][1][V:].abs().sum() == 0


def test_cross_entropy_on_labels_fused_equals_plain():
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(9))
    labels[0, 2] = -100
    kw = {"vocab_size": V, "temperature": 1.5, "chunk_size": 2}
    assert_same(run(LOSSES["cross_entropy"], labels, True, **kw),
                run(LOSSES["cross_entropy"], labels, False, **{**kw, "chunk_size": None}))  # fmt: skip


@pytest.mark.parametrize("name", CROSS)
def test_cross_tokenizer_losses_fused_equal_plain(name):
    teacher = teacher_logits()
    kw = {"vocab_size": V, "temperature": 2.0, "teacher_vocab_size": V - 2}
    if name == "uld_hybrid":
        kw["matched"] = (torch.arange(0, 20, 2), torch.arange(1, 21, 2))
    plain = run(LOSSES[name], teacher.materialise(), False, **kw)
    assert_same(run(LOSSES[name], teacher, True, chunk_size=4, **kw), plain)


def test_eval_without_grad_and_one_backward_only():
    teacher = teacher_logits()
    h, w, b = student_parts()
    with torch.no_grad():
        value = LOSSES["jsd"](LinearLogits(h, w, b), teacher, a_mask(), chunk_size=3, vocab_size=V)
    torch.testing.assert_close(value, LOSSES["jsd"](F.linear(h, w, b), teacher.materialise(), a_mask(), vocab_size=V))
    w = w.clone().requires_grad_(True)
    loss = LOSSES["forward_kl"](LinearLogits(h, w, b), teacher, chunk_size=3, vocab_size=V)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


# ------------------------------------------------------------------------------------------------ models


def test_forward_unprojected_gives_final_hidden_states():
    model = make_llama(64, hidden=32, seed=0)
    ids = torch.randint(3, 64, (2, 9))
    head = output_head(model)
    out, lin = forward_unprojected(model, head, input_ids=ids)
    assert out.logits.shape == (2, 9, 32)  # hidden states: nothing was projected
    torch.testing.assert_close(lin.materialise(), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not head._forward_hooks and not head._forward_pre_hooks


def test_models_that_transform_their_logits_keep_the_plain_path():
    model = make_llama(64, hidden=32, seed=0)
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert output_head(model) is None


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of an input do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def _trainer_step(tmp_path, fused: bool, batch: dict, losses, teacher, chunk_size=4):
    from test_compute_loss import make_trainer

    student = make_llama(256, hidden=32, seed=0).train()
    trainer = make_trainer(tmp_path, student, losses, teacher=teacher, chunk_size=chunk_size, fused=fused,
                           vocab_size=250)  # fmt: skip
    mode = LargestTensor()
    with mode:
        loss = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(90))
        loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return loss.detach(), grads, mode.largest


def _batch(with_topk: bool) -> dict:
    from test_compute_loss import a_batch

    batch = a_batch(250, batch=2, seq=41, prompt=3)
    if with_topk:
        g = torch.Generator().manual_seed(4)
        lp = torch.log_softmax(torch.randn(2, 40, 250, generator=g), -1).topk(6, dim=-1)
        batch.update(topk_ids=lp.indices, topk_logprobs=lp.values, topk_tail=1 - lp.values.exp().sum(-1))
    return batch


@pytest.mark.parametrize("signal", ["online", "offline"])
def test_trainer_fused_equals_plain_and_never_holds_tokens_x_vocab(tmp_path, signal):
    teacher = make_llama(256, hidden=32, seed=1) if signal == "online" else None
    losses = [LossSpec("forward_kl", 0.4, 2.0), LossSpec("jsd", 0.3, params={"beta": 0.3}), LossSpec("cross_entropy", 0.3)]
    batch = _batch(signal == "offline")
    tokens_x_vocab = 2 * 40 * 256
    plain = _trainer_step(tmp_path, False, batch, losses, teacher, chunk_size=None)
    fused = _trainer_step(tmp_path, True, batch, losses, teacher)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], rtol=1e-5, atol=1e-5, msg=name)
    assert plain[2] >= tokens_x_vocab  # the plain path does build the full logits ...
    assert fused[2] < tokens_x_vocab / 2  # ... the fused one at most a chunk's, and weight-sized gradients


def test_fused_and_one_chunk_size_are_the_default_of_distill_train_and_the_trainer(tmp_path):
    """One chunk-size default everywhere (issue 20: the Trainer's default, unchunked, differed from distill train's)."""
    from test_compute_loss import make_trainer

    from distill.config import load_config
    from distill.losses.fused import DEFAULT_CHUNK_SIZE
    from distill.training.train import loss_chunk_size

    model = make_llama(64, hidden=16, seed=0)
    cfg = load_config(None)
    assert cfg.train.fused and not load_config(None, ["train.fused=false"]).train.fused
    trainer = make_trainer(tmp_path, model, [LossSpec("forward_kl")])
    assert trainer.fused and trainer.chunk_size == loss_chunk_size(cfg.train.chunk_size) == DEFAULT_CHUNK_SIZE
    assert not make_trainer(tmp_path, model, [LossSpec("forward_kl")], chunk_size=16, fused=False).fused


def test_fused_chunks_hold_a_bounded_number_of_logits(monkeypatch):
    from distill.losses import fused

    seen = []
    original = fused.F.linear
    monkeypatch.setattr(fused.F, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or original(x, w, b))
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 4 * (V + PAD))
    h, w, b = student_parts()
    LOSSES["forward_kl"](LinearLogits(h, w.requires_grad_(True), b), teacher_logits().materialise(), chunk_size=1000)
    assert seen and max(seen) == 4  # 4 tokens x vocab per chunk, not 1000


def test_bf16_weights_accumulate_their_gradient_in_fp32():
    """Many chunks of a bf16 lm_head: the fused weight gradient stays as close to an fp64 reference as the plain
    path's single bf16 matmul (it is summed over chunks in fp32 and rounded once)."""
    h, w, b = rand(10, 8, 64, D).to(torch.bfloat16), rand(11, V, D).to(torch.bfloat16), rand(12, V).to(torch.bfloat16)
    teacher = rand(13, 8, 64, V, scale=2.0)
    grads = {}
    for name, dtype, student_of in (
        ("ref", torch.float64, lambda h, w, b: F.linear(h, w, b)),
        ("plain", torch.bfloat16, lambda h, w, b: F.linear(h, w, b)),
        ("fused", torch.bfloat16, lambda h, w, b: LinearLogits(h, w, b)),
    ):
        wt = w.to(dtype).clone().requires_grad_(True)
        loss = LOSSES["forward_kl"](student_of(h.to(dtype), wt, b.to(dtype)), teacher.to(dtype), chunk_size=1,
                                    vocab_size=V)  # fmt: skip
        loss.backward()
        assert wt.grad.dtype == dtype
        grads[name] = wt.grad.double()
    err = {k: float((grads[k] - grads["ref"]).abs().max()) for k in ("plain", "fused")}
    assert err["fused"] <= 2 * err["plain"] + 1e-6, err


def _count_projected_rows(monkeypatch, weight: torch.Tensor) -> list[int]:
    """Rows projected through `weight` (F.linear calls, the model's own empty lm_head call included), per call."""
    from distill.losses import fused

    rows: list[int] = []
    original = fused.F.linear

    def linear(x, w, b=None):
        if w.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            rows.append(x.shape[:-1].numel())
        return original(x, w, b)

    monkeypatch.setattr(fused.F, "linear", linear)
    return rows


@pytest.mark.parametrize("signal", ["online", "offline"])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_default_recipe_projects_each_counted_token_once(tmp_path, monkeypatch, signal, chunk_size):
    """forward_kl + cross_entropy (the default recipe) share one lm_head projection per chunk (issue 18: main
    projected the student's counted tokens once per loss), and an online teacher's rows are projected once too
    (with a second teacher divergence, jsd)."""
    from test_compute_loss import make_trainer

    student = make_llama(256, hidden=32, seed=0).train()
    teacher = make_llama(256, hidden=32, seed=1) if signal == "online" else None
    batch = _batch(signal == "offline")
    losses = [LossSpec("forward_kl", 0.6, 2.0), LossSpec("cross_entropy", 0.4), LossSpec("jsd", 0.1)]
    trainer = make_trainer(tmp_path, student, losses, teacher=teacher, chunk_size=chunk_size, vocab_size=250)
    counted = int((batch["labels"][:, 1:] != -100).sum())
    rows = _count_projected_rows(monkeypatch, student.lm_head.weight)
    teacher_rows = _count_projected_rows(monkeypatch, teacher.lm_head.weight) if teacher is not None else []
    trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(counted)).backward()
    assert sum(rows) == counted, rows
    if chunk_size is not None:
        assert max(rows) <= chunk_size
    if teacher is not None:
        assert sum(teacher_rows) == counted, teacher_rows


def test_shared_projection_equals_plain_with_per_example_weights_and_logs_each_component(tmp_path):
    """Per-example loss weights (chain of thought) and different masks per loss (cross_entropy skips the prompt,
    a teacher-token mask may differ): one shared pass gives the plain path's loss, gradients and component logs."""
    teacher = make_llama(256, hidden=32, seed=1)
    batch = {**_batch(False), "loss_weight": torch.tensor([1.0, 0.25])}
    losses = [LossSpec("forward_kl", 0.5, 1.5), LossSpec("cross_entropy", 0.3), LossSpec("tvd", 0.2)]
    logged = {}
    for fused in (False, True):
        from test_compute_loss import make_trainer

        student = make_llama(256, hidden=32, seed=0).train()
        trainer = make_trainer(tmp_path, student, losses, teacher=teacher, chunk_size=5 if fused else None,
                               fused=fused, vocab_size=250)  # fmt: skip
        loss = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(90))
        loss.backward()
        logged[fused] = (loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()},
                         {k: v[0] for k, v in trainer._component_sums.items()})  # fmt: skip
    torch.testing.assert_close(logged[True][0], logged[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in logged[False][1].items():
        torch.testing.assert_close(logged[True][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert logged[True][2].keys() == {"forward_kl", "cross_entropy", "tvd"}
    for name, value in logged[False][2].items():
        assert abs(logged[True][2][name] - value) < 1e-5, name
