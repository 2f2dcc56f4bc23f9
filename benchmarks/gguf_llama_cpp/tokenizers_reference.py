"""Write GGUF files for the three tokenizer kinds the GGUF writer handles (byte-level BPE, SentencePiece-style
BPE, the math tutor's character vocabulary) and the ids transformers gives ~200 texts, for tokenize.mjs to
compare llama.cpp's tokenization against.

Run as: `OMP_NUM_THREADS=1 PYTHONPATH=src:tests python benchmarks/gguf_llama_cpp/tokenizers_reference.py OUT_DIR`
then `node benchmarks/gguf_llama_cpp/tokenize.mjs OUT_DIR` (node-llama-cpp installed, see export_teacher.py).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from conftest import CORPUS, make_tokenizer
from test_export_gguf import MATH_TOKENIZER, _llama, _sentencepiece_tokenizer
from transformers import AutoTokenizer

from distill.exporting.gguf import export_gguf
from distill.recipes.math_tutor import make_problems


def main(out: Path) -> None:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABC XYZ 0123456789 .,:;!?+-*/=()'\"  \u00e9\u00fc\u20ac\u4e2d\t"
    texts = sorted(set(CORPUS)) + [p.prompt + p.solution for p in make_problems(50, seed=1)]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(150)]
    kinds = {"bpe": make_tokenizer(chat_template=True), "sentencepiece": _sentencepiece_tokenizer(),
             "char": AutoTokenizer.from_pretrained(MATH_TOKENIZER)}
    ref = {}
    for name, tok in kinds.items():
        path = export_gguf(_llama(len(tok)), tok, out / f"tok-{name}.gguf")["path"]
        usable = [t for t in texts if name != "char" or set(t) <= set(tok.get_vocab())]
        ref[name] = {"path": path, "rows": [[t, tok(t, add_special_tokens=False).input_ids] for t in usable]}
        print(name, len(usable), "texts")
    (out / "tokenizers.json").write_text(json.dumps(ref))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
