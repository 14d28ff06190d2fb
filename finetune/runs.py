"""``finetune runs [DIR]``: one line per finished run under a folder, to compare them at a glance.

A finished run is a folder holding ``metrics.json`` and ``finetune_config.yaml`` (runs of ``finetune glue``,
``<out>/<task>/seed-<n>``, count too). Columns: model, task, the metric that picked the best checkpoint with
its value on the first evaluated split, training time and training samples per second.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import FinetuneError
from finetune.report import best_value

RUN_FILES = ("metrics.json", "finetune_config.yaml")
HEADER = ("run", "model", "task", "metric", "value", "time", "samples/s")


@dataclass(frozen=True)
class RunSummary:
    run: str
    model: str
    task: str
    metric: str
    value: float | None
    seconds: float | None
    samples_per_second: float | None

    def cells(self) -> tuple[str, ...]:
        return (self.run, self.model, self.task, self.metric, shown(self.value, "{:.4f}"),
                shown(self.seconds, "{:.0f} s"), shown(self.samples_per_second, "{:.1f}"))


def shown(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def run_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that holds a finished run, in path order."""
    if not root.is_dir():
        raise FinetuneError(f"runs: {root} is not a directory")
    found = {path.parent for path in root.rglob(RUN_FILES[0]) if (path.parent / RUN_FILES[1]).is_file()}
    return sorted(p for p in found if "checkpoint-" not in p.name)


def summarize(path: Path, root: Path) -> RunSummary:
    config = yaml.safe_load((path / "finetune_config.yaml").read_text()) or {}
    metrics = json.loads((path / "metrics.json").read_text())
    data, training = config.get("data") or {}, config.get("training") or {}
    metric = training.get("metric_for_best_model") or "-"
    value = best_value(metrics.get("eval") or {}, metric)
    train = metrics.get("train") or {}
    return RunSummary(
        run=str(path.relative_to(root)) if path != root else path.name,
        model=str((config.get("model") or {}).get("model_name_or_path", "-")),
        task="/".join(str(v) for v in (data.get("task"), data.get("task_name")) if v) or "-",
        metric=metric,
        value=value,
        seconds=train.get("train_runtime"),
        samples_per_second=train.get("train_samples_per_second"),
    )


def format_table(rows: Sequence[RunSummary]) -> str:
    cells = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    numeric = {4, 5, 6}
    return "\n".join(
        "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths,
                                                                                                       strict=True)))
        .rstrip()
        for line in cells
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finetune runs", description="Compare the finished runs under a folder.")
    parser.add_argument("dir", nargs="?", default="runs", help="folder to search (default: runs)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    folders = run_folders(root)
    if not folders:
        print(f"no finished runs under {root}")
        return 0
    print(format_table([summarize(path, root) for path in folders]))
    return 0
