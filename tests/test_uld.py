"""Cross-tokenizer distillation: ULD / hybrid loss identities, alignment, and a training run across tokenizers."""

import json

import pytest
import torch
from conftest import make_llama, make_tokenizer

from distill.config import load_config
from distill.data.batching import tokenize_pair
from distill.data.crosstok import CrossTokenizer
from distill.losses import LOSSES, VocabMismatchError, align_responses, matched_vocab, uld, uld_hybrid
from distill.losses.uld import sorted_l1


def test_uld_is_zero_for_identical_and_permuted_distributions_and_positive_otherwise():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 11)
    assert float(uld(s, s.clone())) == pytest.approx(0.0, abs=1e-6)
    perm = torch.randperm(11)
    assert float(uld(s, s[..., perm])) == pytest.approx(0.0, abs=1e-6)  # ULD only sees sorted probabilities
    # a wider teacher vocabulary whose extra rows have no mass is still the same sorted distribution
    wide = torch.cat([s, torch.full((2, 5, 6), -1e9)], dim=-1)
    assert float(uld(s, wide)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 17)
    assert float(uld(s, t)) > 0.01
    assert "uld" in LOSSES and "uld_hybrid" in LOSSES


def test_uld_matches_its_definition_and_respects_mask_and_normalisation():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ps = torch.softmax(s, -1).sort(-1, descending=True).values
    pt = torch.softmax(t, -1).sort(-1, descending=True).values
    ps = torch.nn.functional.pad(ps, (0, 2))  # pad the shorter vocabulary with zeros
    per_tok = (ps - pt).abs().sum(-1)
    expected = per_tok[mask].sum() / 5
    torch.testing.assert_close(uld(s, t, mask), expected)
    torch.testing.assert_close(uld(s, t, mask, num_items_in_batch=10), expected * 5 / 10)
    # garbage at masked positions cannot reach the value or the gradient
    s2 = s.clone().requires_grad_(True)
    t_bad = t.clone()
    t_bad[~mask] = float("nan")
    out = uld(s2, t_bad, mask)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s2.grad).all()
    assert s2.grad[~mask].abs().sum() == 0
    # temperature applies to both sides, times T^2
    torch.testing.assert_close(uld(s, t, mask, temperature=2.0), 4.0 * uld(s / 2, t / 2, mask))


def test_uld_chunked_equals_plain_and_has_gradient():
    torch.manual_seed(2)
    s = torch.randn(3, 6, 13, requires_grad=True)
    t = torch.randn(3, 6, 19)
    mask = torch.rand(3, 6) > 0.3
    plain = uld(s, t, mask)
    (g_plain,) = torch.autograd.grad(plain, s)
    chunked = uld(s, t, mask, chunk_size=4)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    torch.testing.assert_close(plain, chunked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_plain, g_chunked, rtol=1e-5, atol=1e-6)
    assert g_plain.abs().sum() > 0


def test_sorted_l1_pads_the_shorter_side():
    a = torch.tensor([[0.7, 0.3]])
    b = torch.tensor([[0.5, 0.2, 0.3]])  # sorted: 0.5, 0.3, 0.2
    torch.testing.assert_close(sorted_l1(a, b), torch.tensor([0.2 + 0.0 + 0.2]))


def test_hybrid_exact_on_matched_tokens():
    """All tokens matched: the hybrid is the exact divergence (forward KL at beta=0) on remapped ids."""
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    perm = torch.randperm(6)  # teacher id i is student id perm[i]
    t_ids, s_ids = torch.arange(6), perm
    t_in_student_order = torch.empty_like(t)
    t_in_student_order[..., perm] = t
    got = uld_hybrid(s, t, matched=(t_ids, s_ids))
    want = LOSSES["forward_kl"](s, t_in_student_order)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(uld_hybrid(s, t_in_student_order, matched=(torch.arange(6), torch.arange(6)))) > 0
    same = uld_hybrid(s, s.clone(), matched=(torch.arange(4), torch.arange(4)))  # 2 unmatched: sorted part
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="matched"):
        uld_hybrid(s, t)
    with pytest.raises(TypeError, match="dense"):
        from distill.signals import SparseSignal

        uld(s, SparseSignal(torch.zeros(2, 3, 1, dtype=torch.long), torch.zeros(2, 3, 1)))


def test_matched_vocab_by_string_and_alignment_by_response_index():
    tok_a, tok_b = make_tokenizer(300), make_tokenizer(200)
    t_ids, s_ids = matched_vocab(tok_b, tok_a)
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    inv_a, inv_b = {i: s for s, i in va.items()}, {i: s for s, i in vb.items()}
    assert 0 < len(t_ids) < len(va)
    assert all(inv_a[int(t)] == inv_b[int(s)] for t, s in zip(t_ids, s_ids))

    # teacher: 2 prompt + 4 response tokens; student: 3 prompt + 3 response tokens -> 3 aligned positions
    t_targets = torch.tensor([[-100, 5, 6, 7, 8, -100]])  # shifted labels, one pad
    s_targets = torch.tensor([[-100, -100, 9, 9, 9, -100, -100]])
    t_logits = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(1, 6, 3).clone()
    aligned, mask = align_responses(t_logits, t_targets, s_targets)
    assert mask.tolist() == [[False, False, True, True, True, False, False]]
    assert aligned[0, 2:5, 0].tolist() == [1.0, 2.0, 3.0]  # teacher rows of response tokens 0, 1, 2
    assert aligned[0, ~mask[0]].abs().sum() == 0


def test_offset_alignment_pairs_the_same_character_not_the_same_index():
    """A student with one token for "12" against a character teacher: each student position is paired with the
    teacher position that predicts the piece starting at the same character, so nothing drifts after the first
    number; only pairs of the same string are marked exact. Index pairing compared '+' with ' ' from there on."""
    from distill.data.crosstok import add_teacher_side, counted_ids
    from distill.modeling import load_tokenizer_for
    from distill.recipes import math_tutor

    s_tok = load_tokenizer_for(str(math_tutor.number_tokenizer_path()))
    t_tok = load_tokenizer_for(str(math_tutor.teacher_path()))
    ex = tokenize_pair(s_tok, "Tom has 12 apples and buys 5 more. How many?", "12 + 5 = 17. The answer is 17.", 160)
    (out,) = add_teacher_side([ex], s_tok, t_tok, 160)
    s_str = s_tok.convert_ids_to_tokens(counted_ids(ex["input_ids"], ex["labels"]))
    t_str = t_tok.convert_ids_to_tokens(counted_ids(out["teacher_input_ids"], out["teacher_labels"]))
    assert s_str[:3] == ["12", " ", "+"] and t_str[:4] == ["1", "2", " ", "+"]
    index, exact = out["teacher_index"], out["teacher_exact"]
    assert len(index) == len(s_str) and -1 not in index
    for j, k in enumerate(index):  # same first character, same string exactly where the pieces agree
        assert t_str[k] == s_str[j][0] or s_str[j] == t_str[k] == "</s>"
        assert exact[j] == int(s_str[j] == t_str[k])
    assert [s_str[j] for j, e in enumerate(exact) if not e] == ["12", "17", "17"]

    # align_responses with the index puts teacher row k (predicting t_str[k]) at student position j
    s_targets = torch.tensor([ex["labels"]])[:, 1:]
    t_targets = torch.tensor([out["teacher_labels"]])[:, 1:]
    t_rows = torch.arange(t_targets.shape[1], dtype=torch.float32).view(1, -1, 1)
    aligned, mask = align_responses(t_rows, t_targets, s_targets, torch.tensor([index]))
    t_pos = (t_targets[0] != -100).nonzero(as_tuple=True)[0]
    s_pos = (s_targets[0] != -100).nonzero(as_tuple=True)[0]
    assert mask[0].nonzero(as_tuple=True)[0].tolist() == s_pos.tolist()
    assert aligned[0, s_pos, 0].tolist() == [float(t_pos[k]) for k in index]
    positional, _ = align_responses(t_rows, t_targets, s_targets)
    assert positional[0, s_pos[2], 0] != aligned[0, s_pos[2], 0]  # '+' paired with ' ' by index
    from distill.losses import place_counted

    placed = place_counted(torch.tensor([exact], dtype=torch.bool), s_targets)
    assert placed[0, s_pos].tolist() == [bool(e) for e in exact] and int(placed.sum()) == sum(exact)


def test_hybrid_compares_shared_ids_only_where_the_aligned_tokens_agree():
    """Rows marked not exact get whole-vocabulary ULD (sorted L1), rows marked exact the GOLD hybrid."""
    torch.manual_seed(4)
    s, t = torch.randn(1, 4, 6), torch.randn(1, 4, 8)
    matched = (torch.arange(5), torch.arange(5))
    exact = torch.tensor([[True, False, True, False]])
    got = uld_hybrid(s, t, matched=matched, exact=exact)
    full = sorted_l1(s.softmax(-1)[0], t.softmax(-1)[0])
    per_row = []
    for i in range(4):
        one = uld_hybrid(s[:, i : i + 1], t[:, i : i + 1], matched=matched)
        per_row.append(float(one) if exact[0, i] else float(full[i]))
    assert float(got) == pytest.approx(sum(per_row) / 4, rel=1e-5)
    everywhere = uld_hybrid(s, t, matched=matched, exact=torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(everywhere, uld_hybrid(s, t, matched=matched))


def test_mismatch_error_points_at_uld():
    from distill.losses import check_tokenizers

    with pytest.raises(VocabMismatchError, match="train.losses"):
        check_tokenizers(make_tokenizer(200), make_tokenizer(300))


# ------------------------------------------------------------------------------------------------ training


def _held_out_uld(student, teacher, s_tok, t_tok, texts) -> float:
    """Token-mean ULD between student and teacher on held-out text, aligned by response index."""
    total, count = 0.0, 0
    for text in texts:
        s_ex = tokenize_pair(s_tok, "", text, 64)
        t_ex = tokenize_pair(t_tok, "", text, 64)
        with torch.no_grad():
            s_logits = student(torch.tensor([s_ex["input_ids"]])).logits[:, :-1]
            t_logits = teacher(torch.tensor([t_ex["input_ids"]])).logits[:, :-1]
        s_targets = torch.tensor([s_ex["labels"]])[:, 1:]
        aligned, mask = align_responses(t_logits, torch.tensor([t_ex["labels"]])[:, 1:], s_targets)
        n = int(mask.sum())
        total += float(uld(s_logits, aligned, mask, vocab_size=len(s_tok), teacher_vocab_size=len(t_tok))) * n
        count += n
    return total / count


@pytest.mark.parametrize("loss", ["uld", "uld_hybrid"])
def test_training_across_tokenizers_lowers_uld(tmp_path, tokenizer, loss):
    from test_trainer import random_text

    from distill.modeling import load_model
    from distill.training.train import train

    teacher_dir = tmp_path / "teacher"
    teacher = make_llama(len(tokenizer), hidden=64, layers=2, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    s_tok = make_tokenizer(200)  # another BPE: other merges, other ids
    student_dir = tmp_path / "student_base"
    make_llama(len(s_tok), hidden=32, layers=1, seed=2).save_pretrained(student_dir)
    s_tok.save_pretrained(student_dir)
    assert s_tok.get_vocab() != tokenizer.get_vocab()

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in random_text(120, seed=0)) + "\n")
    cfg = load_config({
        "run_dir": str(tmp_path / "run"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"init": "pretrained", "model": str(student_dir)},
        "train": {"input": str(data), "signal": "online", "max_steps": 40, "learning_rate": 1e-2,
                  "per_device_train_batch_size": 8, "logging_steps": 10, "save_steps": 1000,
                  "lr_scheduler_type": "constant", "losses": [{"name": loss}]},
    })
    held = random_text(8, seed=99)
    before = _held_out_uld(load_model(student_dir), teacher, s_tok, tokenizer, held)
    (out,) = train(cfg)
    after = _held_out_uld(load_model(out), teacher, s_tok, tokenizer, held)
    assert after < 0.8 * before, (before, after)
    log = json.loads((out / "train_log.json").read_text())
    assert any(f"loss_{loss}" in e for e in log)

    # a same-tokenizer divergence with this student is still refused, pointing at ULD
    bad = load_config(cfg.model_dump(mode="json"), ["train.losses=[{name: forward_kl}]"])
    with pytest.raises(VocabMismatchError, match="uld"):
        train(bad)


def test_cross_tokenizer_info():
    a, b = make_tokenizer(300), make_tokenizer(200)
    info = CrossTokenizer.from_tokenizers(b, a)
    assert info.teacher_vocab_size == len(a) and len(info.matched[0]) == len(info.matched[1]) > 0
