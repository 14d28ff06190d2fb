"""Classification and regression metrics (GLUE's official ones) from scikit-learn and scipy.

The evaluate library's GLUE metric is a script fetched from the Hub at run time, which cannot load
offline; these are the same definitions computed with the libraries that script itself calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

MetricFn = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, MetricFn] = {
    "accuracy": lambda preds, labels: float(accuracy_score(labels, preds)),
    "f1": lambda preds, labels: float(f1_score(labels, preds)),
    "matthews_correlation": lambda preds, labels: float(matthews_corrcoef(labels, preds)),
    "pearson": lambda preds, labels: float(pearsonr(preds, labels)[0]),
    "spearmanr": lambda preds, labels: float(spearmanr(preds, labels)[0]),
}


def predicted_labels(logits: np.ndarray, is_regression: bool) -> np.ndarray:
    """Class ids (argmax) for classification, the squeezed score for regression."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)


def score(metric_names: Sequence[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics, plus ``combined_score`` (their mean) when there are several, as run_glue.py reports."""
    results = {name: METRICS[name](preds, labels) for name in metric_names}
    if len(results) > 1:
        results["combined_score"] = float(np.mean(list(results.values())))
    return results
