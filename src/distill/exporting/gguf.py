"""GGUF export (llama.cpp, Ollama, LM Studio) for the Llama / Mistral / Qwen2 students distill builds.

Tensor names, metadata keys and the tokenizer layout follow llama.cpp's convert_hf_to_gguf.py: the names come
from gguf's own tensor map, Llama/Mistral q/k rows are permuted into llama.cpp's rotary layout (Qwen2 is not),
norms stay float32. The tokenizer goes in too, with its special tokens (CONTROL), added tokens (USER_DEFINED),
chat template and add-BOS flag:
- a byte-level BPE (GPT-2, Llama 3, Qwen2) as `tokenizer.ggml.model = gpt2` with its merges and split rule;
- a SentencePiece-style BPE (Llama 2, Mistral: U+2581 spaces, <0xXX> byte fallback) as `llama`, with scores
  that order merges like the BPE ranks and BYTE-typed byte tokens;
- a character-level WordLevel vocabulary (the shipped math-tutor tokenizer) as a `gpt2` BPE with no merges,
  which splits text into the same single characters.

Run as: `distill export runs/demo/students/small --out dist/small --gguf --gguf-type q8_0`
"""

from __future__ import annotations

import json
import re
from pathlib import Path

GGUF_HINT = 'GGUF export needs the gguf package: pip install "distill[gguf]"'
GGUF_TYPES = ("f16", "q8_0")
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> llama.cpp arch
PERMUTED = {"llama"}  # archs whose q/k rows llama.cpp stores interleaved (rotary pairs side by side)
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values; other rows are written as f16


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(f"{GGUF_HINT} ({exc})") from exc
    return gguf


def _permute(w, n_head: int, n_head_kv: int):
    """HF's rotate-half q/k layout -> llama.cpp's (convert_hf_to_gguf's LlamaModel.permute)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _check_config(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"--gguf: model_type '{model_type}' is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))} (the families distill builds)")
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(f"--gguf: rope scaling '{rope_type}' is not supported by this writer; export without --gguf")
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ValueError("--gguf: a Llama with attention_bias / mlp_bias is not supported by this writer")
    return ARCHITECTURES[model_type]


# ---- tokenizer -------------------------------------------------------------------------------------
def _byte_spelling(text: str, table: dict[int, str]) -> str:
    return "".join(table[b] for b in text.encode("utf-8"))


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizers pre-tokenizer: the split rule BPE merges were learned on."""
    if pre is None:
        return "default"
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else "default"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        split = next((p for p in parts if p.get("type") == "Split"), None)
        if split is not None:
            regex = split.get("pattern", {}).get("Regex")
            try:
                from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
            except ImportError:
                GGUF_PRE_TOKENIZER_SPLITS = {}
            for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
                if known == regex:
                    return name
        if any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
            return "gpt-2"
    raise ValueError(f"--gguf: the tokenizer's pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp name; "
                     "supported: byte-level BPE (gpt-2, llama-bpe, qwen2 splits), SentencePiece-style BPE and "
                     "character-level WordLevel")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """What llama.cpp's tokenizer needs: model (`gpt2` or `llama`), tokens (padded to the model's vocab with
    UNUSED rows), token types, merges (and scores), pre-tokenizer name, special ids, add-BOS/EOS, chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    vocab = tokenizer.get_vocab()
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in spec.get("added_tokens", []) if not t.get("special")}  # e.g. <think>
    if len(vocab) > vocab_size:
        raise ValueError(f"--gguf: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} rows")
    by_id: list[str | None] = [None] * vocab_size
    for token, index in vocab.items():
        by_id[index] = token
    table = bytes_to_unicode()
    if model["type"] == "BPE" and _is_sentencepiece(spec):
        return _sentencepiece_fields(tokenizer, spec, by_id, special, added)
    if model["type"] == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        tokens = by_id
    elif model["type"] == "WordLevel":
        # A character vocabulary: spelled in the byte-level alphabet so the `gpt2` tokenizer, which has no
        # merges to apply, cuts text into the same characters. A multi-byte character needs one merge.
        merges, tokens, pre = [], [], "default"
        for token in by_id:
            if token is None or token in special:
                tokens.append(token)
                continue
            spelled = _byte_spelling(token, table)
            if len(token) != 1 or len(spelled) > 2:
                raise ValueError(f"--gguf: WordLevel token {token!r} is not a single character of at most 2 "
                                 "UTF-8 bytes; only character-level WordLevel tokenizers can be written")
            if len(spelled) == 2:
                merges.append(f"{spelled[0]} {spelled[1]}")
            tokens.append(spelled)
    else:
        raise ValueError(f"--gguf: tokenizer model '{model['type']}' is not supported (byte-level BPE or "
                         "character-level WordLevel)")
    # llama.cpp token types: UNUSED (padding rows), CONTROL (special), USER_DEFINED (added, matched whole), NORMAL
    types = [5 if t is None else 3 if t in special else 4 if t in added else 1 for t in by_id]
    tokens = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges, "pre": pre,
            **_special_fields(tokenizer)}


def _special_fields(tokenizer) -> dict:
    """Special ids, whether encoding adds BOS / EOS (probed, not guessed), and the chat template."""
    probe = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return {
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id,
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] != plain[:1],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] != plain[-1:],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def _is_sentencepiece(spec: dict) -> bool:
    """A BPE converted from SentencePiece (Llama 2, Mistral, TinyLlama): spaces become U+2581 and unknown
    characters fall back to <0xXX> byte tokens."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    return bool(spec["model"].get("byte_fallback")) and ("Metaspace" in text or "\\u2581" in text or "\u2581" in text)


def _sentencepiece_fields(tokenizer, spec: dict, by_id: list, special: set, added: set) -> dict:
    """llama.cpp's `llama` (SentencePiece) tokenizer: tokens as spelled, a score per token that orders merges
    like the BPE ranks (llama.cpp merges the highest-scoring pair first), BYTE / CONTROL / USER_DEFINED types,
    and the merges too (transformers rebuilds the tokenizer from them)."""
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), i)
    unk = tokenizer.unk_token or spec["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i, token in enumerate(by_id):
        tokens.append(f"[PAD{i}]" if token is None else token)
        scores.append(-1000.0 if token is None else -float(rank[token]) if token in rank else 0.0)
        if token is None:
            types.append(5)  # UNUSED
        elif token in special:
            types.append(2 if token == unk else 3)  # UNKNOWN, CONTROL
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(6)  # BYTE
        else:
            types.append(4 if token in added else 1)
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    prefix = '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text
    return {"model": "llama", "tokens": tokens, "types": types, "merges": merges, "scores": scores,
            "pre": "default", "add_space_prefix": prefix, **_special_fields(tokenizer)}


def _write_tokenizer(writer, fields: dict) -> None:
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if "scores" in fields:
        writer.add_token_scores(fields["scores"])
        writer.add_add_space_prefix(fields["add_space_prefix"])
    if fields["merges"]:
        writer.add_token_merges(fields["merges"])
    else:  # llama.cpp refuses a BPE vocabulary without the key, so a character vocabulary writes it empty
        gguf = _gguf()
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if fields[key] is not None:
            add(fields[key])
    writer.add_add_bos_token(bool(fields["add_bos"]))
    writer.add_add_eos_token(bool(fields["add_eos"]))
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])


def _writer(gguf, path: Path, arch: str):
    """gguf's writer, allowing an empty typed array (the format has them; gguf-py's packer refuses them)."""

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(str(path), arch)


# ---- weights ---------------------------------------------------------------------------------------
def _tensor_data(gguf, name: str, array, gguf_type: str):
    """(data, raw_dtype) the way convert_hf_to_gguf stores them: 1-D tensors (norms, biases) in float32,
    matrices in f16 or q8_0 (f16 where a row does not split into q8_0 blocks)."""
    import numpy as np

    if array.ndim <= 1:
        return array.astype(np.float32), None
    if gguf_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return array.astype(np.float16), None


def export_gguf(model, tokenizer, out_path: str | Path, gguf_type: str = "f16", name: str | None = None) -> dict:
    """Write `model` (+ its tokenizer) as one GGUF file; returns path, bytes, type and tensor count."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf-type '{gguf_type}': choose one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    import torch

    config = model.config
    arch = _check_config(config)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    vocab_size = config.vocab_size

    writer = _writer(gguf, path, arch)
    writer.add_name(name or path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tokenizer_fields(tokenizer, vocab_size))

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for key, tensor in model.state_dict().items():
        if (tied and key == "lm_head.weight") or key.endswith("rotary_emb.inv_freq"):
            continue  # tied: llama.cpp reuses token_embd; inv_freq is recomputed from rope.freq_base
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"--gguf: no llama.cpp name for tensor '{key}' ({arch})")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if arch in PERMUTED and key.endswith(("q_proj.weight", "k_proj.weight")):
            array = _permute(array, n_head, n_head if key.endswith("q_proj.weight") else n_kv)
        data, raw = _tensor_data(gguf, target, array, gguf_type)
        writer.add_tensor(target, data, raw_dtype=raw)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "bytes": path.stat().st_size, "type": gguf_type, "architecture": arch,
            "tensors": count}


def load_gguf(path: str | Path, dtype=None):
    """(model, tokenizer) from a .gguf with plain transformers (it dequantizes to `dtype`, float32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
