"""ROUGE, sacreBLEU, chrF (evaluate's modules, as the generation tasks score) and the helpers around them,
against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.generation_metrics import first_sentence, mean_length, sentences
from finetune.metrics import MetricSpec, TextScorer

rouge = TextScorer([MetricSpec("rouge")], sentence_split=sentences)
bleu_and_chrf = TextScorer([MetricSpec("sacrebleu"), MetricSpec("chrf")])


def test_identical_texts_score_100_and_disjoint_texts_0() -> None:
    text = "The cat sat on the mat. It was warm."
    assert rouge([text], [[text]]) == pytest.approx(dict.fromkeys(("rouge1", "rouge2", "rougeL", "rougeLsum"), 100.0))
    assert rouge(["alpha beta gamma"], [["delta epsilon zeta"]]) == pytest.approx(
        dict.fromkeys(("rouge1", "rouge2", "rougeL", "rougeLsum"), 0.0)
    )
    same = bleu_and_chrf([text, "a quick brown fox jumps"], [[text], ["a quick brown fox jumps"]])
    assert same["sacrebleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    disjoint = bleu_and_chrf(["aaaa bbbb cccc dddd"], [["wxyz vuts rqpo nmlk"]])
    assert disjoint["sacrebleu"] == pytest.approx(0.0) and disjoint["chrf"] == pytest.approx(0.0)


def test_rouge_known_small_case() -> None:
    # 2 of 3 unigrams match each way: P = R = F = 2/3; bigrams: "the cat" only, 1 of 2: F = 1/2.
    scores = rouge(["the cat sat"], [["the cat ran"]])
    assert scores["rouge1"] == pytest.approx(200 / 3)
    assert scores["rouge2"] == pytest.approx(50.0)
    assert scores["rougeL"] == pytest.approx(200 / 3)
    # Porter stemming: "running cats" matches "run cat".
    assert rouge(["running cats"], [["run cat"]])["rouge1"] == pytest.approx(100.0)


def test_rouge_takes_the_best_reference_and_averages_examples() -> None:
    assert rouge(["the cat sat"], [["dog", "the cat sat"]])["rouge1"] == pytest.approx(100.0)
    assert rouge(["a b", "c d"], [["a b"], ["x y"]])["rouge1"] == pytest.approx(50.0)


def test_rouge_lsum_splits_sentences() -> None:
    # As one sequence the LCS is "a b" (2 of 4 tokens); per sentence, each sentence matches fully.
    prediction, reference = "C d. A b.", "A b. C d."
    scores = rouge([prediction], [[reference]])
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_bleu_known_case_and_signature() -> None:
    # Hypothesis = reference minus its last word: all n-gram precisions 1, brevity penalty exp(1 - 6/5).
    scores = bleu_and_chrf(["the quick brown fox jumps"], [["the quick brown fox jumps high"]])
    assert scores["sacrebleu"] == pytest.approx(100 * np.exp(1 - 6 / 5), abs=1e-3)
    assert "tok:13a" in scores["sacrebleu_signature"] and "nrefs:1" in scores["sacrebleu_signature"]
    assert "nc:6" in scores["chrf_signature"]  # chrF's character n-gram order


def test_bleu_with_a_variable_number_of_references() -> None:
    scores = bleu_and_chrf(
        ["the quick brown fox jumps", "hello there my good friend"],
        [["a slow red dog sits", "the quick brown fox jumps"], ["hello there my good friend"]],
    )
    assert scores["sacrebleu"] == pytest.approx(100.0)
    assert "nrefs:var" in scores["sacrebleu_signature"]


def test_sentences_and_lead_1() -> None:
    assert sentences("First one. Second one! Third?\nFourth") == ["First one.", "Second one!", "Third?", "Fourth"]
    assert sentences("Costs rose 2.5 per cent. Then fell.") == ["Costs rose 2.5 per cent.", "Then fell."]
    assert first_sentence("Only one sentence here") == "Only one sentence here"
    assert first_sentence("") == ""


def test_mean_length_skips_special_tokens_and_fill() -> None:
    ids = np.array([[0, 5, 6, 7, 1], [0, 5, 1, -100, -100]])
    assert mean_length(ids, special_ids=[0, 1]) == pytest.approx(2.0)
