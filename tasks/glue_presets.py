"""The GLUE tasks as presets of the glue family: where each task's data is and how it is scored.

Everything task-specific (columns, label names, metrics, splits, submission file) is a field of a row of
``GLUE_TASKS``; ``tasks/glue.py`` reads the row and has no per-task branches.
"""

from __future__ import annotations

from dataclasses import dataclass

GLUE_DATASET = "nyu-mll/glue"
MNLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class GluePreset:
    """One GLUE task: where its data is and how it is scored."""

    text_column: str
    text_pair_column: str | None
    #: official metrics (keys of evaluate's ``glue`` module), in the order the GLUE leaderboard reports them
    metrics: tuple[str, ...]
    #: label names for tasks whose labels the dataset may not name (AX is test-only); None: regression
    label_names: tuple[str, ...] | None = None
    is_regression: bool = False
    eval_splits: tuple[str, ...] = ("validation",)
    predict_splits: tuple[str, ...] = ("test",)
    #: GLUE submission file per predict split
    submission_files: tuple[str, ...] = ()
    #: the task whose fine-tuned model makes the predictions (AX is scored with an MNLI model)
    trained_as: str | None = None
    best_metric: str = "accuracy"
    #: predicted label name -> the string the GLUE server expects in the submission file (binary tasks are
    #: scored as 0/1); empty: the label name itself, or the score for regression
    submission_labels: tuple[tuple[str, str], ...] = ()
    #: regression scores are clipped to the range the server scores (STS-B: 0 to 5)
    submission_range: tuple[float, float] | None = None


GLUE_TASKS: dict[str, GluePreset] = {
    "cola": GluePreset(
        "sentence", None, ("matthews_correlation",), submission_files=("CoLA.tsv",),
        best_metric="matthews_correlation",
        submission_labels=(("unacceptable", "0"), ("acceptable", "1")),
    ),
    "sst2": GluePreset(
        "sentence", None, ("accuracy",), submission_files=("SST-2.tsv",),
        submission_labels=(("negative", "0"), ("positive", "1")),
    ),
    "mrpc": GluePreset(
        "sentence1", "sentence2", ("f1", "accuracy"), submission_files=("MRPC.tsv",), best_metric="f1",
        submission_labels=(("not_equivalent", "0"), ("equivalent", "1")),
    ),
    "qqp": GluePreset(
        "question1", "question2", ("f1", "accuracy"), submission_files=("QQP.tsv",), best_metric="f1",
        submission_labels=(("not_duplicate", "0"), ("duplicate", "1")),
    ),
    "stsb": GluePreset(
        "sentence1",
        "sentence2",
        ("pearson", "spearmanr"),
        is_regression=True,
        submission_files=("STS-B.tsv",),
        best_metric="pearson",
        submission_range=(0.0, 5.0),
    ),
    "mnli": GluePreset(
        "premise",
        "hypothesis",
        ("accuracy",),
        label_names=MNLI_LABELS,
        eval_splits=("validation_matched", "validation_mismatched"),
        predict_splits=("test_matched", "test_mismatched"),
        submission_files=("MNLI-m.tsv", "MNLI-mm.tsv"),
        best_metric="validation_matched_accuracy",
    ),
    "qnli": GluePreset("question", "sentence", ("accuracy",), submission_files=("QNLI.tsv",)),
    "rte": GluePreset("sentence1", "sentence2", ("accuracy",), submission_files=("RTE.tsv",)),
    "wnli": GluePreset(
        "sentence1", "sentence2", ("accuracy",), submission_files=("WNLI.tsv",),
        submission_labels=(("not_entailment", "0"), ("entailment", "1")),
    ),
    "ax": GluePreset(
        "premise",
        "hypothesis",
        ("accuracy",),
        label_names=MNLI_LABELS,
        eval_splits=(),
        submission_files=("AX.tsv",),
        trained_as="mnli",
    ),
}

CUSTOM = GluePreset("sentence", None, ("accuracy",))
CUSTOM_REGRESSION = GluePreset("sentence", None, ("pearson", "spearmanr"), is_regression=True, best_metric="pearson")

