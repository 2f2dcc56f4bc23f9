"""The SmolLM2 example's task metric: the answer names the reference capital (case-insensitive, whole words).

Used as `eval.metric: examples/smollm2/metric.py:names_capital` (any `fn(prediction, reference) -> float`).
"""

from __future__ import annotations

import re


def names_capital(prediction: str, reference: str) -> float:
    return float(re.search(rf"\b{re.escape(reference)}\b", prediction, flags=re.IGNORECASE) is not None)
