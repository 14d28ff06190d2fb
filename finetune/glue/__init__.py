"""``finetune glue``: fine-tune and evaluate one checkpoint on the GLUE tasks, then report and submit.

* ``runner``: the command; trains each task's recipe per seed, predicts the test splits;
* ``report``: ``glue_results.json`` / ``.md``, the chart, and the folder's model card for ``finetune push``;
* ``submission``: the GLUE server's TSV files, zipped.

This module holds what they share: the record of one task and the names of the output files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.tasks.glue import GLUE_DATASET

RESULTS_JSON = "glue_results.json"
RESULTS_MD = "glue_results.md"
CHART = "glue_scores.png"
SUBMISSION_DIR = "submission"
SUBMISSION_ZIP = "glue_submission.zip"


@dataclass
class TaskResult:
    """What happened to one task; ``metrics``: split -> metric -> {mean, std, values} over seeds."""

    status: str = "pending"  # done | failed | skipped
    reason: str | None = None
    dataset: str = GLUE_DATASET
    config: str | None = None
    runs: dict[str, str] = field(default_factory=dict)  # seed -> run directory (relative to the output)
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    score: dict[str, Any] | None = None  # {mean, std, values}: the GLUE task score (mean of its metrics)
    best_run: str | None = None
    submission: dict[str, int] = field(default_factory=dict)  # file -> rows
    note: str | None = None
