"""Summarization: a document in, a short summary out, scored with ROUGE against the lead-1 baseline.

Presets are rows of ``SUMMARIZATION_TASKS``; without one, ``text_column`` / ``summary_column`` name
the columns of a Hub dataset or of local csv/json/jsonl/parquet files.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from finetune import generation_metrics, metrics
from finetune.generation import GenerationTask, TextColumns


@dataclass(frozen=True)
class SummarizationPreset:
    """A summarization dataset: where it is and which columns hold the document and the summary."""

    dataset_name: str
    dataset_config_name: str | None
    text_column: str
    summary_column: str


SUMMARIZATION_TASKS: dict[str, SummarizationPreset] = {
    "cnn_dailymail": SummarizationPreset("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "xsum": SummarizationPreset("EdinburghNLP/xsum", None, "document", "summary"),
    "samsum": SummarizationPreset("Samsung/samsum", None, "dialogue", "summary"),
    # `source` is the abstract as a list of sentences; `target` holds one or more reference TLDRs.
    "scitldr": SummarizationPreset("allenai/scitldr", "Abstract", "source", "target"),
}


class SummarizationTask(GenerationTask):
    family = "summarization"
    presets = SUMMARIZATION_TASKS
    hub_task_type = "summarization"
    baseline_name = "lead_1"

    def text_columns(self) -> TextColumns:
        cfg = self.config.data
        return TextColumns(
            source=cfg.text_column or (self.preset.text_column if self.preset else "document"),
            reference=cfg.summary_column or (self.preset.summary_column if self.preset else "summary"),
        )

    def dataset_defaults(self) -> tuple[str | None, str | None]:
        return (self.preset.dataset_name, self.preset.dataset_config_name) if self.preset else (None, None)

    def prompt(self) -> tuple[str, str]:
        return "Summarize the following text in one or two sentences.", "Summary:"

    def baseline_predictions(self, raw: Dataset) -> list[str]:
        """Lead-1: the document's first sentence (the first item when the document is a list of sentences)."""
        values = self.text_columns().source_values(raw[:])
        return [(v[0] if v else "") if isinstance(v, list) else generation_metrics.first_sentence(str(v))
                for v in values]

    @classmethod
    def best_metric_of(cls, task_name: str | None) -> str:
        return "rougeL"

    def default_metrics(self) -> tuple[metrics.MetricSpec, ...]:
        return (metrics.MetricSpec("rouge"),)
