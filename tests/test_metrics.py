"""GLUE metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from finetune.tasks.glue import GlueTask
from transformers import EvalPrediction

from finetune.config import parse_run_config
from finetune.metrics import predicted_labels, score


def test_accuracy_and_f1_by_hand() -> None:
    preds = np.array([1, 1, 0, 0, 1])
    labels = np.array([1, 0, 0, 1, 1])
    # TP=2 FP=1 FN=1 -> precision 2/3, recall 2/3, F1 2/3; 3 of 5 correct
    result = score(["f1", "accuracy"], preds, labels)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["combined_score"] == pytest.approx((2 / 3 + 0.6) / 2)


def test_matthews_by_hand() -> None:
    preds = np.array([1, 1, 0, 0, 1])
    labels = np.array([1, 0, 0, 1, 1])
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert score(["matthews_correlation"], preds, labels) == {"matthews_correlation": pytest.approx(expected)}
    assert "combined_score" not in score(["matthews_correlation"], preds, labels)


def test_pearson_and_spearman_by_hand() -> None:
    preds = np.array([1.0, 2.0, 3.0, 4.0])
    labels = np.array([1.0, 3.0, 2.0, 4.0])
    # Pearson: both centred [-1.5,-.5,.5,1.5] vs [-1.5,.5,-.5,1.5]; cov 4 / var 5 -> 0.8
    # Spearman on ranks [1,2,3,4] vs [1,3,2,4]: 1 - 6*2/(4*15) = 0.8
    result = score(["pearson", "spearmanr"], preds, labels)
    assert result["pearson"] == pytest.approx(0.8)
    assert result["spearmanr"] == pytest.approx(0.8)


def test_predicted_labels() -> None:
    logits = np.array([[0.1, 2.0], [3.0, -1.0]])
    assert predicted_labels(logits, is_regression=False).tolist() == [1, 0]
    assert predicted_labels(np.array([[0.5], [2.5]]), is_regression=True).tolist() == [0.5, 2.5]
    assert predicted_labels((logits, np.zeros(2)), is_regression=False).tolist() == [1, 0]


@pytest.mark.parametrize(
    "task_name, expected_keys",
    [
        ("cola", {"matthews_correlation"}),
        ("sst2", {"accuracy"}),
        ("mrpc", {"f1", "accuracy", "combined_score"}),
        ("qqp", {"f1", "accuracy", "combined_score"}),
        ("stsb", {"pearson", "spearmanr", "combined_score"}),
        ("mnli", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("wnli", {"accuracy"}),
    ],
)
def test_each_glue_task_reports_its_official_metrics(task_name: str, expected_keys: set[str]) -> None:
    task = GlueTask(parse_run_config(None, ["--task_name", task_name]))
    regression = task_name == "stsb"
    logits = np.array([[0.3], [0.9], [0.1]]) if regression else np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0.2, 1.0, 0.0]) if regression else np.array([1, 0, 0])
    result = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert set(result) == expected_keys | {"examples"}
    assert result["examples"] == 3
    if "accuracy" in expected_keys:
        assert result["accuracy"] == pytest.approx(2 / 3)
