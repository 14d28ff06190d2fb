"""Translation: WMT-style ``translation`` dict rows, scored with sacreBLEU and chrF against copying the source.

Presets are rows of ``TRANSLATION_TASKS``; ``source_lang`` / ``target_lang`` pick the keys of the
``translation`` column (for presets and for local jsonl files alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from finetune import metrics
from finetune.errors import FinetuneError
from finetune.generation import GenerationTask, TextColumns

TRANSLATION_COLUMN = "translation"

#: language key -> English name, for prompts of decoder-only models
LANGUAGE_NAMES = {"en": "English", "de": "German", "ro": "Romanian", "fr": "French", "cs": "Czech",
                  "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "es": "Spanish", "fi": "Finnish",
                  "tr": "Turkish", "et": "Estonian", "lv": "Latvian"}


@dataclass(frozen=True)
class TranslationPreset:
    """A WMT language pair: the dataset, its config, and the default direction."""

    dataset_name: str
    dataset_config_name: str
    source_lang: str
    target_lang: str


TRANSLATION_TASKS: dict[str, TranslationPreset] = {
    "wmt16-en-ro": TranslationPreset("wmt/wmt16", "ro-en", "en", "ro"),
    "wmt16-ro-en": TranslationPreset("wmt/wmt16", "ro-en", "ro", "en"),
    "wmt14-en-de": TranslationPreset("wmt/wmt14", "de-en", "en", "de"),
    "wmt14-de-en": TranslationPreset("wmt/wmt14", "de-en", "de", "en"),
}


class TranslationTask(GenerationTask):
    family = "translation"
    presets = TRANSLATION_TASKS
    hub_task_type = "translation"
    baseline_name = "copy_source"

    def languages(self) -> tuple[str, str]:
        cfg = self.config.data
        source = cfg.source_lang or (self.preset.source_lang if self.preset else None)
        target = cfg.target_lang or (self.preset.target_lang if self.preset else None)
        if not source or not target:
            raise FinetuneError("translation needs source_lang and target_lang (keys of the translation column)")
        return source, target

    def text_columns(self) -> TextColumns:
        source, target = self.languages()
        return TextColumns(TRANSLATION_COLUMN, TRANSLATION_COLUMN, source_key=source, reference_key=target)

    def load_raw_datasets(self):
        raw = super().load_raw_datasets()
        source, target = self.languages()
        for split, dataset in raw.items():
            pair = dataset[0][TRANSLATION_COLUMN]
            missing = [lang for lang in (source, target) if lang not in pair]
            if missing:
                raise FinetuneError(
                    f"language '{missing[0]}' not in the {split} split's translation column (has: {', '.join(pair)})"
                )
        return raw

    def dataset_defaults(self) -> tuple[str | None, str | None]:
        return (self.preset.dataset_name, self.preset.dataset_config_name) if self.preset else (None, None)

    def prompt(self) -> tuple[str, str]:
        source, target = (LANGUAGE_NAMES.get(lang, lang) for lang in self.languages())
        return f"Translate the following text from {source} to {target}.", f"{target}:"

    def baseline_predictions(self, raw: Dataset) -> list[str]:
        """Copy-source: the untranslated source (scores what names and numbers alone earn)."""
        return self.text_columns().sources(raw[:])

    @classmethod
    def best_metric_of(cls, task_name: str | None) -> str:
        return "sacrebleu"

    def default_metrics(self) -> tuple[metrics.MetricSpec, ...]:
        return metrics.MetricSpec("sacrebleu"), metrics.MetricSpec("chrf")
