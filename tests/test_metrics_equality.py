"""The metrics through `evaluate` equal the hand-wired ones they replaced (scikit-learn/scipy, rouge_score, sacrebleu).

The oracle below is the scoring code of finetune at f358a87, kept verbatim: the same predictions go to it and to
the tasks' scorers (which load evaluate's glue / accuracy / rouge / sacrebleu / chrf modules from the mirror),
and every value must agree to 1e-9, sacrebleu signatures included.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import MIRROR, SAMPLES
from finetune.tasks.glue import GLUE_TASKS, GlueTask
from finetune.tasks.summarization import SummarizationTask
from finetune.tasks.translation import TranslationTask
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction

from finetune.config import parse_run_config
from finetune.generation_metrics import first_sentence, sentences

# ---- oracle: finetune/metrics.py and finetune/generation_metrics.py at f358a87 ----------------------------------

OLD_METRICS = {
    "accuracy": lambda preds, labels: float(accuracy_score(labels, preds)),
    "f1": lambda preds, labels: float(f1_score(labels, preds)),
    "matthews_correlation": lambda preds, labels: float(matthews_corrcoef(labels, preds)),
    "pearson": lambda preds, labels: float(pearsonr(preds, labels)[0]),
    "spearmanr": lambda preds, labels: float(spearmanr(preds, labels)[0]),
}


def old_score(metric_names, preds, labels):
    results = {name: OLD_METRICS[name](preds, labels) for name in metric_names}
    if len(results) > 1:
        results["combined_score"] = float(np.mean(list(results.values())))
    return results


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def old_rouge(predictions, references):
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi([_one_sentence_per_line(r) for r in refs], _one_sentence_per_line(prediction))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    count = max(len(predictions), 1)
    return {name: 100.0 * total / count for name, total in totals.items()}


def _one_sentence_per_line(text):
    return "\n".join(sentences(text))


def old_bleu_and_chrf(predictions, references):
    width = max((len(refs) for refs in references), default=1)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(predictions), streams)
    chrf_score = chrf.corpus_score(list(predictions), streams)
    return {
        "sacrebleu": float(bleu_score.score),
        "chrf": float(chrf_score.score),
        "sacrebleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


# ---- comparisons -------------------------------------------------------------------------------------------------


def assert_same(new: dict, old: dict) -> None:
    assert set(new) == set(old)
    for key, value in old.items():
        if isinstance(value, str):
            assert new[key] == value, key
        else:
            assert new[key] == pytest.approx(value, abs=1e-9, rel=0), key


def glue_task(*args: str) -> GlueTask:
    return GlueTask(parse_run_config(None, list(args)))


@pytest.mark.parametrize("task_name", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])
def test_glue_metrics_equal_the_old_ones(task_name: str) -> None:
    rng = np.random.default_rng(len(task_name))
    task = glue_task("--task_name", task_name)
    preset = GLUE_TASKS[task_name]
    n = 257
    if preset.is_regression:
        # float32, as the Trainer hands over logits and labels (and as evaluate's glue/stsb stores them)
        labels = rng.uniform(0, 5, n).astype(np.float32)
        logits = (labels + rng.normal(0, 1.2, n)).astype(np.float32)[:, None]
    else:
        classes = 3 if task_name == "mnli" else 2
        labels = rng.integers(0, classes, n)
        logits = rng.normal(size=(n, classes)).astype(np.float32)
        logits[np.arange(n), labels] += 0.6  # better than chance, so F1 and MCC are not degenerate
    new = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    preds = np.squeeze(logits, -1) if preset.is_regression else np.argmax(logits, -1)
    assert new.pop("examples") == n
    assert_same(new, old_score(preset.metrics, preds, labels))
    assert list(new)[: len(preset.metrics)] == list(preset.metrics)  # the leaderboard's order, as before


def test_custom_classification_and_regression_equal_the_old_ones(tmp_path) -> None:
    custom = tmp_path / "x.csv"
    custom.write_text("sentence,label\na,0\n")  # the config checks that the file exists
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 100)
    logits = rng.normal(size=(100, 4))
    task = glue_task("--train_file", str(custom))
    new = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert_same({k: v for k, v in new.items() if k != "examples"}, old_score(["accuracy"], logits.argmax(-1), labels))

    task = glue_task("--train_file", str(custom))
    task.is_regression = True  # what load_raw_datasets finds for float labels
    scores = rng.normal(size=100).astype(np.float32)
    noisy = (scores + rng.normal(size=100)).astype(np.float32)
    new = task.compute_metrics(EvalPrediction(predictions=noisy[:, None], label_ids=scores))
    assert_same({k: v for k, v in new.items() if k != "examples"}, old_score(["pearson", "spearmanr"], noisy, scores))


def scitldr_rows(limit: int) -> tuple[list[str], list[list[str]]]:
    table = pq.read_table(MIRROR / "datasets/allenai/scitldr/Abstract/validation-00000-of-00001.parquet")
    rows = table.slice(0, limit).to_pylist()
    return [" ".join(row["source"]) for row in rows], [list(row["target"]) for row in rows]


def test_rouge_equals_the_old_one_with_several_references_per_example() -> None:
    task = SummarizationTask(parse_run_config(None, ["--task", "summarization", "--task_name", "scitldr"]))
    documents, references = scitldr_rows(40)
    assert max(len(r) for r in references) > 1 and min(len(r) for r in references) == 1  # real multi-reference
    lead_1 = [first_sentence(d) for d in documents]
    two_sentences = [" ".join(sentences(d)[:2]) for d in documents]  # several lines for rougeLsum
    for predictions in (lead_1, two_sentences, [""] + lead_1[1:]):
        assert_same(task.score(predictions, references), old_rouge(predictions, references))


def test_rouge_equals_the_old_one_on_xsum_documents() -> None:
    xsum = SAMPLES / "xsum_sample/sample.jsonl"
    task = SummarizationTask(parse_run_config(None, ["--task", "summarization", "--train_file", str(xsum)]))
    rows = [json.loads(line) for line in xsum.read_text().splitlines()]
    predictions = [first_sentence(r["document"]) for r in rows]
    references = [[r["summary"]] for r in rows]
    assert_same(task.score(predictions, references), old_rouge(predictions, references))


def test_sacrebleu_and_chrf_equal_the_old_ones_with_signatures() -> None:
    task = TranslationTask(parse_run_config(None, ["--task", "translation", "--task_name", "wmt16-en-ro"]))
    pairs = [json.loads(line)["translation"] for line in
             (SAMPLES / "newstest2021/en-de.jsonl").read_text().splitlines()[:60]]
    sources, targets = [p["en"] for p in pairs], [p["de"] for p in pairs]
    dropped = [" ".join(t.split()[::2]) for t in targets]  # a half-right "translation"
    one = [[t] for t in targets]
    variable = [[t, s] if i % 3 == 0 else [t] for i, (t, s) in enumerate(zip(targets, sources, strict=True))]
    for predictions, references in ((sources, one), (dropped, one), (dropped, variable)):
        new, old = task.score(predictions, references), old_bleu_and_chrf(predictions, references)
        assert_same(new, old)
    assert "nrefs:var" in new["sacrebleu_signature"]
