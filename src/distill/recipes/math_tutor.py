"""The math-tutor task: arithmetic word problems with exact answers and step-by-step solutions.

It is the built-in demo of distillation: the shipped teacher (in `math_tutor/teacher/`) writes the steps,
a student 10x smaller learns them from the teacher's outputs, and a student trained on final answers only
shows what the steps are worth.

    prompt:   "Q: Lily has 43 cards. She finds 19 more. She sells 30. How many cards now? A:"
    solution: " 43 + 19 = 62. 62 - 30 = 32. The answer is 32."

Everything is seeded and pure Python, so a problem set is the same on every machine. Train and test
(held-out) problems are disjoint by a hash of the arithmetic itself (start number, operations, amounts),
so a test problem never shares its computation with a train problem, whatever its names and objects.

Run as: `python -m distill.recipes.math_tutor 5` (prints five train problems with solutions).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.recipes import recipe_dir

SPLITS = ("train", "test")

# ---------------------------------------------------------------- task settings

MIN_NUMBER = 10  # every amount in a problem has two digits ...
MAX_NUMBER = 99
MAX_VALUE = 99  # ... and so does every intermediate result (sums are capped, differences stay >= 0)
OPS_WEIGHTS = {1: 1, 2: 2}  # one-step vs two-step problems: two steps are where the written steps matter
TEST_PERCENT = 10  # share of the arithmetic (by hash) reserved for held-out problems

#: Recommended `eval.answer_regex` for this task (the config default also captures a trailing ".").
ANSWER_REGEX = r"The answer is (-?\d+)"
_ANSWER_RE = re.compile(ANSWER_REGEX)
_STEP_RE = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)\.")

NAMES = (
    ("Lily", "She"),
    ("Tom", "He"),
    ("Sara", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Sam", "He"),
    ("Ana", "She"),
    ("Leo", "He"),
)
OBJECTS = ("cards", "apples", "stickers", "coins", "marbles", "books", "shells", "pens")
ADD_VERBS = ("{p} finds {n} more.", "{p} buys {n} more.", "{p} gets {n} more.", "{p} wins {n} more.")
SUB_VERBS = ("{p} sells {n}.", "{p} gives away {n}.", "{p} loses {n}.", "{p} uses {n}.")


def task_settings() -> dict[str, Any]:
    """The settings the problems (and the shipped teacher's metrics) depend on."""
    return {
        "min_number": MIN_NUMBER,
        "max_number": MAX_NUMBER,
        "max_value": MAX_VALUE,
        "ops_weights": {str(k): v for k, v in OPS_WEIGHTS.items()},
        "ops": ["+", "-"],
        "test_percent": TEST_PERCENT,
        "answer_regex": ANSWER_REGEX,
    }


# ---------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One word problem; `steps` holds (op, amount, sentence template) in order."""

    name: str
    pronoun: str
    obj: str
    start: int
    steps: tuple[tuple[str, int, str], ...]

    @property
    def prompt(self) -> str:
        parts = [f"Q: {self.name} has {self.start} {self.obj}."]
        parts += [tpl.format(p=self.pronoun, n=n) for _, n, tpl in self.steps]
        parts.append(f"How many {self.obj} now? A:")
        return " ".join(parts)

    def values(self) -> list[int]:
        """Running totals: start, then the value after each step."""
        out = [self.start]
        for op, n, _ in self.steps:
            out.append(out[-1] + n if op == "+" else out[-1] - n)
        return out

    @property
    def answer(self) -> str:
        return str(self.values()[-1])

    @property
    def solution(self) -> str:
        vals = self.values()
        eqs = [f"{vals[i]} {op} {n} = {vals[i + 1]}." for i, (op, n, _) in enumerate(self.steps)]
        return " " + " ".join(eqs) + f" The answer is {vals[-1]}."

    @property
    def key(self) -> str:
        """The arithmetic alone; decides the split."""
        return str(self.start) + "".join(f"{op}{n}" for op, n, _ in self.steps)

    @property
    def split(self) -> str:
        h = int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big")
        return "test" if h % 100 < TEST_PERCENT else "train"


def final_answer_text(answer: str | int) -> str:
    """The response of a final-answer-only label (the labels-only baseline trains on this)."""
    return f" The answer is {answer}."


def _sample(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    start = rng.randint(MIN_NUMBER, MAX_NUMBER)
    n_ops = rng.choices(list(OPS_WEIGHTS), weights=list(OPS_WEIGHTS.values()))[0]
    value, steps = start, []
    for _ in range(n_ops):
        can_add = value + MIN_NUMBER <= MAX_VALUE
        can_sub = value >= MIN_NUMBER
        op = rng.choice("+-") if can_add and can_sub else ("+" if can_add else "-")
        if op == "+":
            n = rng.randint(MIN_NUMBER, min(MAX_NUMBER, MAX_VALUE - value))
            steps.append(("+", n, rng.choice(ADD_VERBS)))
            value += n
        else:
            n = rng.randint(MIN_NUMBER, min(MAX_NUMBER, value))
            steps.append(("-", n, rng.choice(SUB_VERBS)))
            value -= n
    return Problem(name, pronoun, obj, start, tuple(steps))


def make_problems(n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """`n` distinct problems of one split, the same for the same (n, seed, split) on every machine."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    rng = random.Random(f"math_tutor/{seed}/{split}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise RuntimeError(f"could not draw {n} distinct '{split}' problems (got {len(out)})")
        p = _sample(rng)
        if p.split != split or p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


# ---------------------------------------------------------------- scoring


def extract_answer(text: str | None) -> str | None:
    """The number after the first "The answer is", or None."""
    if not text:
        return None
    m = _ANSWER_RE.search(text)
    return m.group(1) if m else None


def exact_match(pred: str | None, ref: str | int) -> bool:
    """True when the prediction's answer (extracted, or the bare number itself) equals the reference."""
    ans = extract_answer(pred)
    if ans is None and pred is not None and re.fullmatch(r"\s*-?\d+\s*", pred):
        ans = pred.strip()
    return ans is not None and ans == str(ref).strip()


def parse_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The equations "a op b = c." written in a solution, as (a, op, b, c)."""
    return [(int(a), op, int(b), int(c)) for a, op, b, c in _STEP_RE.findall(text)]


def check_solution(text: str, problem: Problem) -> bool:
    """Every written step is correct arithmetic, they chain from the start number and end at the answer."""
    steps = parse_steps(text)
    if len(steps) != len(problem.steps) or extract_answer(text) != problem.answer:
        return False
    value = problem.start
    for (a, op, b, c), (pop, pn, _) in zip(steps, problem.steps):
        if a != value or op != pop or b != pn or c != (a + b if op == "+" else a - b):
            return False
        value = c
    return str(value) == problem.answer


def write_jsonl(
    path: str | Path,
    problems: Iterable[Problem],
    with_answers: bool = True,
    with_solutions: bool = False,
    final_only: bool = False,
    with_groups: bool = False,
) -> Path:
    """Rows {"prompt", "answer"?, "response"?, "group"?}: "response" is the full solution (`with_solutions`) or
    the final answer sentence alone (`final_only`, the labels-only baseline); "group" ("1-step" / "2-step",
    `with_groups`) is what the report breaks errors down by (eval.group_field)."""
    if with_solutions and final_only:
        raise ValueError("with_solutions and final_only are exclusive: choose one response kind")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            row: dict[str, str] = {"prompt": p.prompt}
            if with_answers:
                row["answer"] = p.answer
            if with_groups:
                row["group"] = f"{len(p.steps)}-step"
            if with_solutions:
                row["response"] = p.solution
            elif final_only:
                row["response"] = final_answer_text(p.answer)
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------- tokenizer and teacher

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
CHARS = string.printable[:95]  # digits, letters, punctuation, space: one token each


def build_tokenizer():
    """A character-level tokenizer: every printable ASCII character is a token, so digits are single
    tokens and decode(encode(x)) == x. Adds <s> in front like Llama; no chat template (plain prompts)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def build_number_tokenizer():
    """A second tokenizer for the task (the cross-tokenizer recipe's student): every two-digit number is one
    token, everything else one character, so numbers tokenize differently from the teacher's and only the
    single characters are shared between the two vocabularies."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in [f"{n:02d}" for n in range(100)] + list(CHARS):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=256, clean_up_tokenization_spaces=False)


def write_number_tokenizer_base(out: str | Path) -> Path:
    """A base for `student.init: config` with its own tokenizer: the teacher's config with the number
    tokenizer's vocabulary, and that tokenizer (no weights: the student starts fresh)."""
    from transformers import AutoConfig

    out = Path(out)
    tok = build_number_tokenizer()
    cfg = AutoConfig.from_pretrained(teacher_path())
    cfg.vocab_size = len(tok)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def number_tokenizer_path() -> Path:
    """The shipped number-tokenizer base (config + tokenizer), see `write_number_tokenizer_base`."""
    return recipe_dir("math_tutor") / "number_tokenizer"


def tokenizer_path() -> Path:
    return recipe_dir("math_tutor") / "tokenizer"


def teacher_path() -> Path:
    """The shipped teacher (HF format, safetensors, with its tokenizer)."""
    return recipe_dir("math_tutor") / "teacher"


def greedy_solve(
    model, tokenizer, prompts: Sequence[str], batch_size: int = 256, max_new_tokens: int = 64
) -> list[str]:
    """Greedy completions (special tokens dropped) for plain-text prompts, batched with left padding."""
    import torch

    from distill.modeling import eos_token_ids

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        device = next(model.parameters()).device
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos_token_ids(model, tokenizer),
                )
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return out


def score(model, tokenizer, problems: Sequence[Problem], batch_size: int = 256) -> float:
    """Exact-match accuracy of greedy solutions."""
    preds = greedy_solve(model, tokenizer, [p.prompt for p in problems], batch_size=batch_size)
    return sum(exact_match(t, p.answer) for t, p in zip(preds, problems)) / max(1, len(problems))


if __name__ == "__main__":
    import sys

    for prob in make_problems(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(prob.prompt + prob.solution)
