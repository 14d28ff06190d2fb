"""``report.html``: one self-contained page per run, to look at rather than read JSON.

It is built from the files a run leaves (``finetune_config.yaml``, ``metrics.json``, ``trainer_state.json``,
the prediction files, ``config.json``), so it can be rebuilt for any finished run. The page needs no server,
no network and no script: styles are inline and figures are base64 PNGs drawn with matplotlib. It shows the
settings, metrics per epoch, curves (train loss, eval metric, learning rate), and what the model got wrong:
for classification a confusion matrix, precision/recall/F1 per class and the most confident mistakes with
their text; for regression predicted against gold scores; for generation sources, references, predictions
and the baseline side by side.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from finetune import plots
from finetune.page import esc, image, number, page, png, section, table

REPORT_NAME = "report.html"
#: eval entries of the log history that are bookkeeping, not quality
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "examples", "epoch", "step")
BASELINE_PREFIXES = ("lead_1_", "copy_source_")  # the generation families' baselines in metrics.json
TEXT_LIMIT = 400  # characters of a source text shown in a table cell
MISTAKES_SHOWN = 10
EXAMPLES_SHOWN = 20

# Settings worth a row in the summary table; the whole config is in a folded block below it.
KEY_SETTINGS = (
    ("model", "model_name_or_path"), ("model", "gguf_file"), ("data", "task"), ("data", "task_name"),
    ("data", "dataset_name"), ("data", "dataset_config_name"), ("data", "train_file"), ("data", "validation_file"),
    ("data", "metric"), ("data", "max_seq_length"), ("data", "max_train_samples"), ("training", "learning_rate"),
    ("training", "num_train_epochs"), ("training", "per_device_train_batch_size"),
    ("training", "gradient_accumulation_steps"), ("training", "weight_decay"), ("training", "warmup_steps"),
    ("training", "lr_scheduler_type"), ("training", "seed"), ("training", "bf16"), ("training", "fp16"),
    ("training", "metric_for_best_model"),
)


@dataclass
class RunFiles:
    """What a finished run left in its folder (missing files read as empty)."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path) -> RunFiles:
        path = Path(path)
        run = cls(path=path)
        run.config = read_yaml(path / "finetune_config.yaml")
        run.metrics = read_json(path / "metrics.json")
        run.log_history = read_json(path / "trainer_state.json").get("log_history", [])
        run.model_config = read_json(path / "config.json")
        run.split, run.predictions = first_predictions(path, list(run.metrics.get("eval", {})))
        return run

    def setting(self, section: str, name: str) -> Any:
        return (self.config.get(section) or {}).get(name)

    @property
    def family(self) -> str:
        return self.setting("data", "task") or "glue"

    @property
    def metric(self) -> str | None:
        return self.setting("training", "metric_for_best_model")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def first_predictions(path: Path, splits: Sequence[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(split, records) of the first evaluated split that has a predictions file."""
    for split in [*splits, "validation"]:
        for name in (f"predictions_{split}.jsonl", f"generated_predictions_{split}.jsonl",
                     "generated_predictions.jsonl" if split == "validation" else ""):
            if name and (path / name).is_file():
                return split, [json.loads(line) for line in (path / name).read_text().splitlines() if line.strip()]
    return None, []


# -- sections ---------------------------------------------------------------------------------------------------


def best_value(evaluated: Mapping[str, Mapping[str, Any]], metric: str | None) -> float | None:
    """The value of the metric that picked the best checkpoint, on the first evaluated split. Several eval
    splits prefix it with the split's name (MNLI: ``validation_matched_accuracy``)."""
    if not metric or not evaluated:
        return None
    key = metric.removeprefix("eval_")
    for split, values in evaluated.items():
        if key.startswith(f"{split}_") and len(evaluated) > 1:
            return values.get(key.removeprefix(f"{split}_"))
    return next(iter(evaluated.values())).get(key)


def summary(run: RunFiles) -> str:
    train = run.metrics.get("train", {})
    evaluated = run.metrics.get("eval", {})
    best = best_value(evaluated, run.metric)
    facts = [
        ("model", esc(run.setting("model", "model_name_or_path"))),
        ("task", esc(" / ".join(str(v) for v in (run.family, run.setting("data", "task_name")) if v))),
        (f"{run.split or 'validation'} {(run.metric or 'metric').removeprefix(f'{run.split}_')}", number(best)),
        ("train time", "-" if train.get("train_runtime") is None else f"{train['train_runtime']:.0f} s"),
        ("train samples/s", number(train.get("train_samples_per_second"))),
    ]
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"


def settings(run: RunFiles) -> str:
    rows = [(esc(f"{s}.{n}"), esc(run.setting(s, n))) for s, n in KEY_SETTINGS if run.setting(s, n) not in (None, "")]
    everything = yaml.safe_dump(run.config, sort_keys=False)
    return section("settings", "Settings", table(("setting", "value"), rows)
                   + f"<details><summary>Full resolved config</summary><pre>{esc(everything)}</pre></details>")


def metric_names(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for entry in entries:
        for key, value in entry.items():
            bare = key.removeprefix("eval_")
            if key.startswith("eval_") and not bare.endswith(NOT_METRICS) and isinstance(value, (int, float)):
                if key not in names:
                    names.append(key)
    return names


def per_epoch(run: RunFiles) -> str:
    evals = [e for e in run.log_history if any(k.startswith("eval_") for k in e)]
    names = metric_names(evals)
    rows = []
    for entry in evals:
        losses = [e["loss"] for e in run.log_history if "loss" in e and e.get("step", 0) <= entry.get("step", 0)]
        rows.append([number(entry.get("epoch")), number(entry.get("step")), number(losses[-1] if losses else None),
                     *(number(entry.get(n)) for n in names)])
    final = run.metrics.get("eval", {})
    finals = "".join(
        f"<h3>Final: {esc(split)}</h3>"
        + table(("metric", "value"), [(esc(k), number(v)) for k, v in values.items() if not isinstance(v, str)])
        for split, values in final.items()
    )
    body = table(("epoch", "step", "train loss", *(n.removeprefix("eval_") for n in names)), rows) if rows else (
        "<p class=note>No evaluation during training.</p>")
    return section("metrics", "Metrics per epoch", body + finals)


def curves(run: RunFiles) -> str:
    return section("curves", "Curves", image(curves_png(run.log_history, run.metric), "training curves"))


def curves_png(log_history: Sequence[Mapping[str, Any]], metric: str | None) -> bytes | None:
    loss = plots.curve_points(log_history, "loss")
    score = plots.curve_points(log_history, f"eval_{metric}") if metric else ([], [])
    rate = plots.curve_points(log_history, "learning_rate")
    if not (loss[0] or score[0] or rate[0]):
        return None
    figure, axes = plots.plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for axis, (xs, ys), title, style in zip(
        axes, (loss, score, rate), ("train loss", f"eval {metric or 'metric'}", "learning rate"), ("-", "o-", "-"),
        strict=True,
    ):
        if xs:
            axis.plot(xs, ys, style)
        axis.set(title=title, xlabel="step")
        axis.grid(alpha=0.3)
    return png(figure)


def classification(run: RunFiles) -> str:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labelled = [r for r in run.predictions if "label" in r]
    if not labelled:
        return ""
    if isinstance(labelled[0]["prediction"], float):
        return regression(run, labelled)
    names = label_names(run, labelled)
    gold = [str(r["label"]) for r in labelled]
    predicted = [str(r["prediction"]) for r in labelled]
    matrix = confusion_matrix(gold, predicted, labels=names)
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=names, zero_division=0)
    counts = table(("gold \\ predicted", *names),
                   [(f"<b>{esc(name)}</b>", *(str(c) for c in row)) for name, row in zip(names, matrix, strict=True)],
                   "matrix")
    per_class = table(("class", "precision", "recall", "F1", "support"), [
        (esc(n), number(float(p)), number(float(r)), number(float(f)), str(int(s)))
        for n, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    ])
    return (
        section("confusion-matrix", f"Confusion matrix ({run.split}, {len(labelled)} examples)",
                f'<div class="side">{image(confusion_png(matrix, names), "confusion matrix")}{counts}</div>')
        + section("per-class", "Per class", per_class)
        + section("mistakes", "Most confident mistakes", mistakes(run, labelled))
    )


def label_names(run: RunFiles, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The model's label names in id order, plus any name only the data uses."""
    id2label = run.model_config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    seen = {str(r[k]) for r in records for k in ("label", "prediction")}
    return names + sorted(seen - set(names))


def confusion_png(matrix: np.ndarray, names: Sequence[str]) -> bytes:
    size = max(3.5, 0.6 * len(names) + 2)
    figure, axis = plots.plt.subplots(figsize=(size + 0.8, size), constrained_layout=True)
    shown = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(shown, ax=axis, shrink=0.8)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set(xlabel="predicted", ylabel="gold")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        axis.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    return png(figure)


def text_columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    skip = {"index", "label", "prediction", "confidence", "references", "baseline"}
    return [k for k in records[0] if k not in skip] if records else []


def mistakes(run: RunFiles, records: Sequence[Mapping[str, Any]]) -> str:
    wrong = [r for r in records if str(r["label"]) != str(r["prediction"])]
    if not wrong:
        return "<p class=note>No mistakes on this split.</p>"
    wrong.sort(key=lambda r: -float(r.get("confidence", 0.0)))
    columns = text_columns(records)
    rows = [(*(esc(clip(r.get(c, ""))) for c in columns), esc(r["label"]), esc(r["prediction"]),
             number(r.get("confidence"))) for r in wrong[:MISTAKES_SHOWN]]
    return (f"<p>{len(wrong)} of {len(records)} wrong; the {min(len(wrong), MISTAKES_SHOWN)} the model was surest "
            "about:</p>" + table((*columns, "gold", "predicted", "confidence"), rows, "texts"))


def regression(run: RunFiles, records: Sequence[Mapping[str, Any]]) -> str:
    gold = [float(r["label"]) for r in records]
    predicted = [float(r["prediction"]) for r in records]
    figure, axis = plots.plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    axis.scatter(gold, predicted, s=10, alpha=0.6)
    low, high = min(gold + predicted), max(gold + predicted)
    axis.plot([low, high], [low, high], "--", color="grey")
    axis.set(xlabel="gold", ylabel="predicted", title=f"{run.split}: predicted against gold")
    far = sorted(records, key=lambda r: -abs(float(r["prediction"]) - float(r["label"])))[:MISTAKES_SHOWN]
    columns = text_columns(records)
    rows = [(*(esc(clip(r.get(c, ""))) for c in columns), number(float(r["label"])), number(float(r["prediction"])))
            for r in far]
    return (section("scatter", f"Predicted against gold ({run.split}, {len(records)} examples)",
                    image(png(figure), "predicted against gold"))
            + section("mistakes", "Largest errors", table((*columns, "gold", "predicted"), rows, "texts")))


def generation(run: RunFiles) -> str:
    records = run.predictions[:EXAMPLES_SHOWN]
    if not records:
        return ""
    rows = [(esc(clip(r.get("source", ""))), "<hr>".join(esc(x) for x in r.get("references", [])),
             esc(r.get("prediction", "")), esc(r.get("baseline", ""))) for r in records]
    evaluated = run.metrics.get("eval", {}).get(run.split or "", {})
    pairs = [(key.removeprefix(prefix), prefix.rstrip("_"), value) for key, value in evaluated.items()
             for prefix in BASELINE_PREFIXES if key.startswith(prefix)]
    compared = table(("metric", "model", "baseline"), [
        (esc(name), number(evaluated.get(name)), f"{number(value)} ({esc(baseline)})")
        for name, baseline, value in pairs
    ]) if pairs else ""
    return section("examples", f"Examples ({run.split}, first {len(records)} of {len(run.predictions)})",
                   compared + table(("source", "references", "prediction", "baseline"), rows, "texts"))


def clip(text: Any) -> str:
    text = str(text)
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"




def render(run: RunFiles) -> str:
    family = run.family
    details = generation(run) if family in ("summarization", "translation") else classification(run)
    body = f"{summary(run)}{settings(run)}{per_epoch(run)}{curves(run)}{details}"
    return page(f"finetune run: {run.path.resolve().name}", body)




def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into a run folder from the files the run left there."""
    path = Path(run_dir) / REPORT_NAME
    path.write_text(render(RunFiles.read(run_dir)), encoding="utf-8")
    return path
