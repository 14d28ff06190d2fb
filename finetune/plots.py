"""PNG figures for model cards and benchmark reports (matplotlib, drawn off-screen)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must be chosen before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402


def curve_points(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged quantity, in logging order."""
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and entry[key] is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def training_curves(log_history: Sequence[Mapping[str, Any]], metric: str | None, path: str | Path) -> Path | None:
    """Train loss (and eval loss) against step beside the eval metric against step; None if nothing was logged."""
    loss = curve_points(log_history, "loss")
    eval_loss = curve_points(log_history, "eval_loss")
    score = curve_points(log_history, f"eval_{metric}") if metric else ([], [])
    if not loss[0] and not eval_loss[0] and not score[0]:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    if loss[0]:
        left.plot(*loss, label="train loss")
    if eval_loss[0]:
        left.plot(*eval_loss, "o-", label="eval loss")
    left.set(title="Loss", xlabel="step", ylabel="loss")
    left.legend()
    left.grid(alpha=0.3)
    if score[0]:
        right.plot(*score, "o-", color="tab:green", label=f"eval {metric}")
        right.legend()
    right.set(title=f"Eval {metric}" if metric else "Eval metric", xlabel="step", ylabel=metric or "")
    right.grid(alpha=0.3)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def score_bars(
    scores: Mapping[str, tuple[float, float]], path: str | Path, title: str, average: float | None = None
) -> Path:
    """One bar per task (mean score, std error bar, value on top), with the average as a dashed line."""
    names = list(scores)
    means = [scores[n][0] for n in names]
    stds = [scores[n][1] for n in names]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4), constrained_layout=True)
    bars = axes.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.85)
    axes.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=3)
    if average is not None:
        axes.axhline(average, linestyle="--", color="tab:red", label=f"GLUE average {average:.1f}")
        axes.legend(loc="upper right")
    low = min([0.0, *[m - s for m, s in zip(means, stds, strict=True)]])
    axes.set_ylim(low * 1.1, 105)
    axes.set(title=title, ylabel="score (x100)")
    axes.grid(axis="y", alpha=0.3)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def tune_trials(rows: Sequence[Mapping[str, Any]], metric: str, maximize: bool, path: str | Path) -> Path | None:
    """A search's trials: score by trial number with the best so far, and score against learning rate.

    ``rows`` are the search's table rows (``trial``, ``score``, ``std``, ``learning_rate``, ``state``); only
    completed trials have a score. None if no trial has one.
    """
    scored = [r for r in rows if r["score"] is not None and r["state"] == "complete"]
    if not scored:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    numbers = [r["trial"] for r in scored]
    scores = [r["score"] for r in scored]
    errors = [r["std"] or 0.0 for r in scored]
    left.errorbar(numbers, scores, yerr=errors, fmt="o", capsize=3, label="trial (mean +- std over seeds)")
    best, best_so_far = None, []
    for score in scores:
        best = score if best is None or (score > best if maximize else score < best) else best
        best_so_far.append(best)
    left.step(numbers, best_so_far, where="post", color="tab:red", label="best so far")
    stopped = [r["trial"] for r in rows if r["state"] != "complete"]
    if stopped:
        left.plot(stopped, [min(scores)] * len(stopped), "x", color="gray", label="pruned / failed / interrupted")
    left.set(title=f"Search: validation {metric}", xlabel="trial", ylabel=metric)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.errorbar([r["learning_rate"] for r in scored], scores, yerr=errors, fmt="o", capsize=3)
    right.set_xscale("log")
    right.set(title=f"{metric} against learning rate", xlabel="learning rate", ylabel=metric)
    right.grid(alpha=0.3)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
