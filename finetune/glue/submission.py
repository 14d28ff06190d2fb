"""The GLUE server's submission: ``index<TAB>prediction`` files named as it expects, zipped."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from finetune.glue import SUBMISSION_DIR, SUBMISSION_ZIP, TaskResult
from finetune.tasks.glue import GLUE_TASKS, GluePreset


def submission_value(prediction: Any, preset: GluePreset) -> str:
    """The server's label string for one prediction, from the table row's mapping."""
    if preset.is_regression:
        low, high = preset.submission_range or (-np.inf, np.inf)
        return f"{float(np.clip(float(prediction), low, high)):.3f}"
    return dict(preset.submission_labels).get(str(prediction), str(prediction))


def write_submission(out: Path, results: dict[str, TaskResult], tasks: dict[str, dict]) -> Path | None:
    """``index<TAB>prediction`` files named as the server expects, zipped; only for tasks that predicted."""
    folder = out / SUBMISSION_DIR
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.tsv"):
        stale.unlink()
    written = []
    for name, result in results.items():
        if result.status != "done" or result.best_run is None:
            continue
        preset = GLUE_TASKS[name]
        source = out / result.best_run if not preset.trained_as else out / name
        for split, file_name in zip(preset.predict_splits, preset.submission_files, strict=True):
            predictions = source / f"predictions_{split}.jsonl"
            if not predictions.is_file():
                continue
            rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
            lines = ["index\tprediction", *(f"{r['index']}\t{submission_value(r['prediction'], preset)}" for r in rows)]
            (folder / file_name).write_text("\n".join(lines) + "\n")
            result.submission[file_name] = len(rows)
            tasks[name]["submission"] = dict(result.submission)
            written.append(folder / file_name)
    archive = out / SUBMISSION_ZIP
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in written:
            bundle.write(path, arcname=path.name)
    return archive
