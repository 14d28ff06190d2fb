"""Scores of generated text: ROUGE (rouge_score) for summaries, sacreBLEU and chrF (sacrebleu) for translations.

Scores are on a 0-100 scale. ROUGE is the mean F-measure over examples; with several references an
example counts its best one (per ROUGE type, as ``RougeScorer.score_multi`` does). BLEU and chrF are
corpus-level, with every reference of an example used, and their sacrebleu signatures are reported so
that the numbers can be compared with published ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

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


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure (x100), stemmed; the best reference of each example counts."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        # rougeLsum reads one sentence per line; the other types ignore line breaks.
        scores = scorer.score_multi([_one_sentence_per_line(r) for r in refs], _one_sentence_per_line(prediction))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    count = max(len(predictions), 1)
    return {name: 100.0 * total / count for name, total in totals.items()}


def _one_sentence_per_line(text: str) -> str:
    return "\n".join(sentences(text))


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference position, None where an example has fewer references."""
    width = max((len(refs) for refs in references), default=1)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def bleu_and_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | str]:
    """Corpus sacreBLEU and chrF with sacrebleu's defaults (13a tokenization), and their signatures."""
    streams = _reference_streams(references)
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(predictions), streams)
    chrf_score = chrf.corpus_score(list(predictions), streams)
    return {
        "sacrebleu": float(bleu_score.score),
        "chrf": float(chrf_score.score),
        "sacrebleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def mean_length(token_ids: np.ndarray, special_ids: Sequence[int]) -> float:
    """Mean number of generated text tokens per example: special tokens (start, end, padding) and -100 fill
    are not counted."""
    if token_ids.size == 0:
        return 0.0
    real = (token_ids >= 0) & ~np.isin(token_ids, list(special_ids))
    return float(real.sum(axis=-1).mean())
