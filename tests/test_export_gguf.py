"""GGUF export: round trips through transformers' own GGUF loader (it dequantizes), for the Llama / Qwen2 /
Mistral students distill builds, with the tokenizer written too (byte-level BPE and character-level)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer

pytest.importorskip("gguf")

from distill.exporting import gguf as gguf_export
from distill.exporting.gguf import export_gguf, load_gguf

# Tolerances on logits: max abs diff vs the float32 student, relative to the student's max |logit| (the random
# students use initializer_range 0.1 so attention matters: |logits| ~3). Measured on the 2-layer GQA Llama:
# f16 8e-4, q8_0 2.5e-2; skipping the rotary permutation gives 0.62 (the negative control).
F16_RTOL, Q8_RTOL, BROKEN = 3e-3, 6e-2, 0.2
MATH_TOKENIZER = Path(__file__).resolve().parents[1] / "src/distill/recipes/math_tutor/tokenizer"
TEXTS = ["Q: Tom has 12 apples. He eats 5. How many apples now? A:", "hello there, friend!\n 0123 + - * /",
         "The quick brown fox"]


def _ids(tok):
    rows = [tok(t).input_ids[:12] for t in TEXTS]
    return torch.tensor([r + [r[-1]] * (12 - len(r)) for r in rows])


def _rel_diff(student, loaded, ids) -> float:
    with torch.no_grad():
        want = student(input_ids=ids).logits
        return float((loaded(input_ids=ids).logits - want).abs().max() / want.abs().max())


def _llama(vocab: int, kv: int = 2, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=128,
                                        initializer_range=0.1, **kw)).eval()


def _qwen2(vocab: int, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        initializer_range=0.1, **kw)).eval()


def _mistral(vocab: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    return MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, sliding_window=None,
                                            initializer_range=0.1)).eval()


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer(chat_template=True)


@pytest.mark.parametrize("gguf_type,rtol", [("f16", F16_RTOL), ("q8_0", Q8_RTOL)])
def test_llama_round_trip_logits_and_tokenizer(tmp_path, bpe, gguf_type, rtol):
    student = _llama(len(bpe), kv=2)  # GQA: k rows are permuted with the kv head count
    result = export_gguf(student, bpe, tmp_path / f"s-{gguf_type}.gguf", gguf_type)
    loaded, tok = load_gguf(result["path"])
    assert type(loaded).__name__ == "LlamaForCausalLM" and result["tensors"] == 2 * 9 + 3
    ids = _ids(bpe)
    assert _rel_diff(student, loaded, ids) < rtol
    for text in TEXTS:
        assert tok(text).input_ids == bpe(text).input_ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.chat_template == bpe.chat_template


def test_q8_0_stores_quantized_matrices_and_float_norms(tmp_path, bpe):
    from gguf import GGMLQuantizationType, GGUFReader

    student = make_llama(len(bpe), hidden=64, layers=2)
    f16 = export_gguf(student, bpe, tmp_path / "a.gguf", "f16")
    q8 = export_gguf(student, bpe, tmp_path / "b.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(q8["path"]).tensors}
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32
    assert q8["bytes"] < 0.65 * f16["bytes"]
    reader = GGUFReader(f16["path"])
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == "llama" and "llama.attention.head_count_kv" in reader.fields


def test_qwen2_and_mistral_with_the_math_tutor_tokenizer(tmp_path):
    """The shipped character-level tokenizer (WordLevel, adds <s>) written as a merge-free byte-level BPE
    (a character outside its vocabulary, <unk> there, is dropped by the GGUF tokenizer)."""
    from transformers import AutoTokenizer

    char_tok = AutoTokenizer.from_pretrained(MATH_TOKENIZER)
    for name, student in (("qwen", _qwen2(len(char_tok))), ("mstrl", _mistral(len(char_tok)))):
        result = export_gguf(student, char_tok, tmp_path / f"{name}.gguf")
        loaded, tok = load_gguf(result["path"])
        assert _rel_diff(student, loaded, _ids(char_tok)) < F16_RTOL, name
        for text in ["Q: 12 + 5 = ? A: 17", "What is 7 times 8? [x] {y} ~!"]:
            assert tok(text).input_ids == char_tok(text).input_ids, name
            assert tok(text).input_ids[0] == char_tok.bos_token_id  # add-BOS carried over
    assert result["architecture"] == "llama"  # llama.cpp runs Mistral as its llama architecture


def test_tied_embeddings_and_padded_vocabulary(tmp_path, bpe):
    student = _llama(len(bpe) + 4, tie_word_embeddings=True)
    result = export_gguf(student, bpe, tmp_path / "tied.gguf")
    loaded, _ = load_gguf(result["path"])
    assert loaded.config.tie_word_embeddings and loaded.config.vocab_size == len(bpe) + 4
    assert result["tensors"] == 2 * 9 + 2  # no output.weight: llama.cpp reuses token_embd
    assert _rel_diff(student, loaded, _ids(bpe)) < F16_RTOL


def test_negative_control_wrong_rotary_layout_is_caught(tmp_path, bpe, monkeypatch):
    """Skipping llama.cpp's q/k permutation still loads, but the logits are far outside the tolerance."""
    student = _llama(len(bpe))
    monkeypatch.setattr(gguf_export, "_permute", lambda w, n_head, n_kv: w)
    loaded, _ = load_gguf(export_gguf(student, bpe, tmp_path / "bad.gguf")["path"])
    assert _rel_diff(student, loaded, _ids(bpe)) > BROKEN


def test_unsupported_inputs_are_clear_errors(tmp_path, bpe):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe), n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        export_gguf(gpt2, bpe, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="--gguf-type 'q4_k'"):
        export_gguf(make_llama(len(bpe), hidden=32, layers=1, heads=2), bpe, tmp_path / "x.gguf", "q4_k")


def test_served_and_loaded_by_distill(tmp_path, bpe):
    """`distill serve FILE.gguf` goes through load_student, which loads the GGUF with transformers."""
    from distill.exporting.export import load_student

    student = _llama(len(bpe))
    path = export_gguf(student, bpe, tmp_path / "s.gguf")["path"]
    model, tok, info = load_student(path, dtype="float32", device="cpu")
    assert info["adapter"] is None and _rel_diff(student, model, _ids(bpe)) < F16_RTOL
    assert tok("hello").input_ids == bpe("hello").input_ids


def test_llama_cpp_runs_the_file(tmp_path, bpe):
    """llama.cpp itself (llama-cpp-python) loads the file, tokenizes like the student, and its logits match."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: no wheel on this index, and a source build "
                            "did not finish within 4 minutes on this machine (tried)")
    import numpy as np

    student = _llama(len(bpe))
    path = export_gguf(student, bpe, tmp_path / "s.gguf")["path"]
    llm = llama_cpp.Llama(model_path=path, logits_all=True, verbose=False, n_ctx=64)
    text = TEXTS[0]
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == bpe(text, add_special_tokens=False).input_ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        want = student(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < F16_RTOL


def test_added_tokens_stay_whole(tmp_path):
    """A non-special added token (like <think>) is USER_DEFINED in the file, so readers match it whole."""
    from gguf import GGUFReader

    tok = make_tokenizer()
    tok.add_tokens(["<think>"])
    student = _llama(len(tok))
    path = export_gguf(student, tok, tmp_path / "added.gguf")["path"]
    field = GGUFReader(path).fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]
    think = tok.convert_tokens_to_ids("<think>")
    assert types[think] == 4 and types[tok.eos_token_id] == 3 and types[100] == 1
    _, loaded = load_gguf(path)
    text = "Q: <think> 3 + 4"
    assert loaded(text).input_ids == tok(text).input_ids and think in tok(text).input_ids


def _sentencepiece_tokenizer(vocab_size: int = 400):
    """A Llama-2 / Mistral style tokenizer: BPE over U+2581-spelled text with <0xXX> byte fallback."""
    import json

    from conftest import CORPUS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def test_sentencepiece_tokenizer_is_written_as_llama_vocab(tmp_path):
    """Written as llama.cpp's `llama` (SentencePiece) vocabulary: byte tokens typed BYTE, merge order kept in
    the scores; transformers reads it back to the same ids, byte fallback included."""
    from gguf import GGUFReader

    tok = _sentencepiece_tokenizer()
    student = _llama(len(tok))
    path = export_gguf(student, tok, tmp_path / "spm.gguf")["path"]
    fields = GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    scores = [float(fields["tokenizer.ggml.scores"].parts[i][0]) for i in fields["tokenizer.ggml.scores"].data]
    assert types[tok.convert_tokens_to_ids("<0x0A>")] == 6 and types[tok.unk_token_id] == 2 and types[1] == 3
    first, second = (m if isinstance(m, str) else "".join(m) for m in tok._merges[:2])
    assert scores[tok.convert_tokens_to_ids(first.replace(" ", ""))] > scores[tok.convert_tokens_to_ids(second.replace(" ", ""))]
    loaded, back = load_gguf(path)
    for text in [*TEXTS, "  two spaces \u00e9\u20ac \u4e2d"]:  # the last one needs byte fallback
        assert back(text).input_ids == tok(text).input_ids
    assert _rel_diff(student, loaded, _ids(tok)) < F16_RTOL


def test_a_gguf_teacher_gives_config_students_and_preflight_checks_them(tmp_path, bpe):
    """`init: config` from a .gguf teacher read the file as config.json ('not a valid JSON file'); preflight
    skipped the shape checks of its students."""
    from distill.config import ConfigError, StudentConfig
    from distill.preflight import check_model
    from distill.students.build import build_student

    path = export_gguf(_llama(len(bpe)), bpe, tmp_path / "t.gguf")["path"]
    cfg = StudentConfig(init="config", config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64})
    student, info = build_student(cfg, teacher_path=str(path))
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 32
    assert student.config.num_attention_heads == 4 and student.config.vocab_size == len(bpe)
    assert info.teacher_params and info.teacher_params > info.student_params
    model_config = check_model(str(path), "teacher.model")
    assert model_config is not None and model_config.num_hidden_layers == 2
    (tmp_path / "fake.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ConfigError, match="teacher.model: .*fake.gguf: transformers cannot read"):
        check_model(str(tmp_path / "fake.gguf"), "teacher.model")
