"""Text helpers of the generation metrics: sentence splitting (ROUGE-Lsum lines, the lead-1 baseline) and the
mean generated length. The scores themselves come from evaluate's modules (``finetune.metrics.TextScorer``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# rouge_score's own sentence splitting for rougeLsum calls nltk.sent_tokenize, whose 'punkt' model must be
# downloaded (impossible offline and a hidden network call otherwise); a sentence-final punctuation rule
# is close to it for news and abstracts and needs nothing.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")


def sentences(text: str) -> list[str]:
    """The sentences of a text (split after . ! ? before a capital or digit, and at line breaks)."""
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def first_sentence(text: str) -> str:
    found = sentences(text)
    return found[0] if found else ""


def mean_length(token_ids: np.ndarray, special_ids: Sequence[int]) -> float:
    """Mean number of generated text tokens per example: special tokens (start, end, padding) and -100 fill
    are not counted."""
    if token_ids.size == 0:
        return 0.0
    real = (token_ids >= 0) & ~np.isin(token_ids, list(special_ids))
    return float(real.sum(axis=-1).mean())
