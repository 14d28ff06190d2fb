"""GLUE (and any sentence / sentence-pair classification or regression data).

The nine GLUE tasks and the AX diagnostic are rows of ``GLUE_TASKS``; everything task-specific
(columns, label names, metrics, splits, submission file) is read from the row. Without a preset,
``text_column`` / ``text_pair_column`` / ``label_column`` describe custom files.
"""

from __future__ import annotations

import logging
import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Value
from finetune.tasks.glue_labels import (
    LabelEncoding,
    WeightedLossTrainer,
    class_weights,
    encode_batch,
    filled_texts,
    head_labels,
    predicted_probability,
)
from finetune.tasks.glue_presets import CUSTOM, CUSTOM_REGRESSION, GLUE_DATASET, GLUE_TASKS, MNLI_LABELS, GluePreset
from transformers import AutoModelForSequenceClassification, EvalPrediction, PretrainedConfig, Trainer
from transformers.trainer_utils import PredictionOutput

from finetune import adapters, data, metrics, modeling
from finetune.errors import FinetuneError
from finetune.metrics import MetricSpec
from finetune.task import Task

# The presets are the family's table; importers read them from here (finetune.tasks.glue) as from any family.
__all__ = ["CUSTOM", "CUSTOM_REGRESSION", "GLUE_DATASET", "GLUE_TASKS", "MNLI_LABELS", "GluePreset", "GlueTask"]


logger = logging.getLogger("finetune")


class GlueTask(Task):
    """Sequence classification (or regression) with an ``AutoModelForSequenceClassification`` head."""

    family = "glue"
    presets = GLUE_TASKS
    hub_task_type = "text-classification"
    supports_class_weights = True

    def __init__(self, config):
        super().__init__(config)
        cfg = config.data
        row = self.preset or CUSTOM
        self.text_column = cfg.text_column or row.text_column
        self.text_pair_column = cfg.text_pair_column or row.text_pair_column
        self.label_column = cfg.label_column or "label"
        #: class id -> label: the ClassLabel / preset names, or the sorted values of custom data's label column
        self.label_values: list[Any] | None = None
        #: whether the label column holds the values themselves (custom data), not class ids (ClassLabel)
        self.labels_are_values = False
        self.is_regression = row.is_regression
        #: dataset label id -> model label id (they differ when a checkpoint's head orders names differently)
        self.label_to_model_id: dict[int, int] | None = None
        self.head_kwargs: dict[str, Any] | None = None

    @property
    def row(self) -> GluePreset:
        if self.preset is not None:
            return self.preset
        return CUSTOM_REGRESSION if self.is_regression else CUSTOM

    def dataset_id(self) -> tuple[str | None, str | None]:
        if data.local_files(self.config.data):
            return None, None
        name = self.config.data.dataset_name or (GLUE_DATASET if self.preset else None)
        return name, self.config.data.dataset_config_name or self.config.data.task_name

    # -- data ----------------------------------------------------------------------------------------------

    def load_raw_datasets(self) -> DatasetDict:
        cfg = self.config.data
        if self.preset is None and not data.local_files(cfg) and not cfg.dataset_name:
            raise FinetuneError("set task_name (a GLUE task) or dataset_name / train_file for custom data")
        name, config_name = self.dataset_id()
        raw = data.load_raw_datasets(cfg, name, config_name)
        where = name or "the data files"
        data.require_columns(raw, [self.text_column, self.text_pair_column], where)
        data.require_columns(
            DatasetDict({s: raw[s] for s in raw if s not in self.predict_splits(raw)}), [self.label_column], where
        )
        for split in raw:
            data.require_rows(raw[split], split, where)
        raw = self.with_empty_texts(raw)
        self.label_values, self.is_regression, self.labels_are_values = self.labels_of(raw)
        metrics.require_averages(self.metric_specs(), len(self.label_values or ()))
        # Decided now, not at model loading: labels are tokenized as the checkpoint's head ids.
        self.head_kwargs = self.head_settings(self.checkpoint)
        return raw

    def say(self, message: str) -> None:
        """One warning line for the whole run: every process reads the data, the main process tells."""
        if self.config.training.process_index == 0:
            logger.warning(message)

    def resolve_labels(self) -> None:
        """The label set and the head settings come from the data: hooks that need them read it (from the
        datasets cache after the first time) when ``load_raw_datasets`` has not run, so they can be called alone."""
        if self.head_kwargs is None:
            self.load_raw_datasets()

    @property
    def label_names(self) -> list[str] | None:
        """Class id -> name, as the model's id2label stores it (custom values as text: 10 -> "10")."""
        return None if self.label_values is None else [str(v) for v in self.label_values]

    def where(self, split: str) -> str:
        """How an error names a split: its file, else the split of the dataset."""
        file = data.local_files(self.config.data).get(split)
        return f"the {split} file {file}" if file else f"the {split} split of {self.dataset_id()[0]}"

    def with_empty_texts(self, raw: DatasetDict) -> DatasetDict:
        """Empty text cells (read as null from csv) become empty strings: still examples, counted in the log."""
        columns = [c for c in (self.text_column, self.text_pair_column) if c]
        fixed = {}
        for split, dataset in raw.items():
            nulls = {c: dataset.data.column(c).null_count for c in columns}
            if not any(nulls.values()):
                fixed[split] = dataset
                continue
            for column, count in nulls.items():
                if count:
                    self.say(f"finetune: {self.where(split)} has {count} row(s) with empty text in column "
                                   f"'{column}'; they are kept as empty texts")
            empty = [c for c, count in nulls.items() if count]
            fixed[split] = dataset.map(
                filled_texts, fn_kwargs={"columns": empty}, batched=True, desc=f"Filling empty texts of {split}"
            )
        return DatasetDict(fixed)

    def labels_of(self, raw: DatasetDict) -> tuple[list[Any] | None, bool, bool]:
        """(class id -> label, is_regression, labels_are_values) of the data, checked split by split.

        Names come from a ClassLabel feature, else the preset; custom labels are the sorted values of the
        train split (numbers in numeric order), as run_glue.py does; float labels mean regression.
        """
        if self.row.is_regression:
            return None, True, False
        for split in raw.values():
            feature = split.features.get(self.label_column)
            if isinstance(feature, ClassLabel):
                return list(feature.names), False, False
        if self.row.label_names:
            return list(self.row.label_names), False, False
        predicting = self.predict_splits(raw)
        labelled = [s for s in raw if s not in predicting] or list(raw)
        for split in labelled:
            self.require_labels(raw[split], split)
        source = "train" if "train" in labelled else labelled[0]
        feature = raw[source].features.get(self.label_column)
        if isinstance(feature, Value) and feature.dtype.startswith("float"):
            return None, True, False
        values = sorted(set(raw[source][self.label_column]))
        for split in raw:
            if split != source and self.label_column in raw[split].column_names:
                self.require_known_labels(raw[split], split, values, source, unlabelled_ok=split in predicting)
        return values, False, True

    def require_labels(self, dataset: Dataset, split: str) -> None:
        """Every row of a split that trains or scores needs a label: a missing one is an error, not a guess."""
        missing = [i for i, v in enumerate(dataset[self.label_column]) if v is None or (isinstance(v, float) and
                                                                                       math.isnan(v))]
        if missing:
            raise FinetuneError(
                f"{self.where(split)}: {len(missing)} row(s) without a value in label column '{self.label_column}' "
                f"(first: data row {missing[0] + 1}); fill them in or remove those rows"
            )

    def require_known_labels(
        self, dataset: Dataset, split: str, values: list[Any], source: str, unlabelled_ok: bool
    ) -> None:
        """A label that the training labels lack has no class id: name it rather than train or score wrongly."""
        known = set(values)
        # In prediction splits a missing label, or GLUE's -1 placeholder, means "unlabelled".
        unlabelled = {None, -1} - known if unlabelled_ok else set()
        unseen = set(dataset[self.label_column]) - known - unlabelled
        if unseen:
            first = sorted(unseen, key=str)[0]
            raise FinetuneError(
                f"label {first!r} in {self.where(split)} (column '{self.label_column}') is not among the "
                f"{source} labels {values}"
            )

    def eval_splits(self, raw: DatasetDict) -> list[str]:
        if self.preset is None:
            return super().eval_splits(raw)
        return [s for s in self.row.eval_splits if s in raw]

    def predict_splits(self, raw: DatasetDict) -> list[str]:
        if self.preset is None:
            return super().predict_splits(raw)
        return [s for s in self.row.predict_splits if s in raw]

    # -- model ---------------------------------------------------------------------------------------------

    def load_tokenizer(self):
        return modeling.load_tokenizer(self.config.model)

    def load_model(self, tokenizer):
        self.resolve_labels()
        model = modeling.load_model(
            AutoModelForSequenceClassification, self.config.model, self.config.peft, **self.head_kwargs
        )
        modeling.align_pad_token(model, tokenizer)
        # The classification loss is a per-batch mean that ignores `num_items_in_batch`, but its forward takes
        # **kwargs, so the Trainer (5.x, average_tokens_across_devices) would multiply it by the process
        # count: N processes would report N x the train and eval loss (and scale the gradients).
        adapters.base_of(model).accepts_loss_kwargs = False
        return model

    def trainer(self, **kwargs: Any) -> Trainer:
        weights = self.loss_weights(kwargs.get("train_dataset"))
        if weights is None or self.config.training.padding_free:  # the base class refuses padding_free
            return super().trainer(**kwargs)
        return WeightedLossTrainer(args=self.config.trainer_arguments(), class_weights=weights, **kwargs)

    def loss_weights(self, train_dataset: Dataset | None) -> torch.Tensor | None:
        """Per-class loss weights in model label order from ``--class_weights``, or None for the plain loss.

        The weights used replace the setting (dataset label order), so the saved config and the model card
        show the numbers the loss used, and ``auto`` reruns reproduce them.
        """
        setting = self.config.training.class_weights
        if setting is None or train_dataset is None:
            return None
        if self.is_regression:
            raise FinetuneError("class_weights is for classification; this task is a regression")
        model_ids = np.asarray(train_dataset["labels"])
        by_name = class_weights(setting, self.dataset_label_ids(model_ids[model_ids >= 0]), self.label_names)
        # `auto` depends on the data: new arguments (see RunConfig.replace_training), not an edited field
        self.config.replace_training(class_weights=",".join(f"{w:.6g}" for w in by_name))
        in_model_order = [0.0] * len(by_name)
        for data_id, weight in enumerate(by_name):
            in_model_order[(self.label_to_model_id or {}).get(data_id, data_id)] = weight
        return torch.tensor(in_model_order, dtype=torch.float32)

    def head_settings(self, checkpoint: PretrainedConfig) -> dict[str, Any]:
        """from_pretrained kwargs for the classification head, reusing a trained head when its labels match.

        A head for other labels is an error unless ``--ignore_mismatched_sizes``: then a head of another
        size is replaced by a new one, and one of the same size is relabelled (run_glue.py's behaviour).
        """
        self.label_to_model_id = None
        names = self.label_names
        wanted: dict[str, Any] = (
            {"num_labels": 1, "problem_type": "regression"}
            if self.is_regression
            else {
                "num_labels": len(names),
                "id2label": dict(enumerate(names)),
                "label2id": {name: i for i, name in enumerate(names)},
            }
        )
        existing = head_labels(checkpoint)
        if existing is None:
            return wanted
        named = not all(name == f"LABEL_{i}" for i, name in enumerate(existing))
        if not self.is_regression and named and sorted(existing) == sorted(names):
            self.label_to_model_id = {i: existing.index(name) for i, name in enumerate(names)}
            return {}
        if len(existing) == wanted["num_labels"] and not named:
            return wanted  # a generic head of the right size: its outputs are simply named after the data's labels
        data = "a regression (1 output)" if self.is_regression else f"{len(names)} labels {names}"
        checkpoint_name = self.config.model.model_name_or_path
        if not self.config.model.ignore_mismatched_sizes:
            raise FinetuneError(
                f"checkpoint '{checkpoint_name}' has a classification head for labels {existing}, but the data has "
                f"{data}; pass --ignore_mismatched_sizes true to start a new head, or start from a checkpoint "
                "without that head"
            )
        if len(existing) == wanted["num_labels"]:
            self.say(
                f"finetune: --ignore_mismatched_sizes: the classification head of '{checkpoint_name}' (labels "
                f"{existing}) is relabelled for {data}; its weights are the starting point"
            )
            return wanted
        self.say(
            f"finetune: --ignore_mismatched_sizes: the classification head of '{checkpoint_name}' (labels "
            f"{existing}) is replaced by a new one for {data}"
        )
        return {**wanted, "ignore_mismatched_sizes": True}

    def tokenize(self, raw: DatasetDict, tokenizer) -> DatasetDict:
        cfg = self.config.data
        encoding = {
            "tokenizer": tokenizer,
            "columns": (self.text_column, self.text_pair_column, self.label_column),
            "max_length": cfg.max_seq_length,
            "padding": "max_length" if cfg.pad_to_max_length else False,
            "labels": LabelEncoding(
                self.is_regression, tuple(self.label_values or ()), self.labels_are_values, self.label_to_model_id
            ),
        }
        limits = {"train": cfg.max_train_samples}
        tokenized = {}
        for split, dataset in raw.items():
            predicting = split in self.predict_splits(raw)
            limit = limits.get(split, cfg.max_predict_samples if predicting else cfg.max_eval_samples)
            dataset = data.truncated(dataset, limit)
            if predicting and self.label_column in dataset.column_names:
                dataset = dataset.remove_columns(self.label_column)
            tokenized[split] = data.tokenized(dataset, split, encode_batch, encoding, cfg)
        return DatasetDict(tokenized)

    # -- metrics -------------------------------------------------------------------------------------------

    @classmethod
    def best_metric_of(cls, task_name: str | None) -> str:
        return (cls.preset_named(task_name) or CUSTOM).best_metric

    @classmethod
    def metric_names_of(cls, task_name: str | None) -> frozenset[str]:
        # Custom data is classification or regression depending on its labels: either set of metrics.
        rows = [cls.preset_named(task_name)] if task_name else [CUSTOM, CUSTOM_REGRESSION]
        names = set()
        for row in rows:
            per_split = {"loss", "examples", *row.metrics, *(["combined_score"] if len(row.metrics) > 1 else [])}
            # With several evaluation splits (MNLI matched/mismatched) the Trainer prefixes each with its split.
            splits = row.eval_splits if len(row.eval_splits) > 1 else ("",)
            names |= {f"{split}_{name}" if split else name for split in splits for name in per_split}
        return frozenset(names)

    @property
    def best_metric(self) -> str:
        if self.config.data.metric:
            return super().best_metric
        return self.row.best_metric  # custom data whose labels are scores: the regression metric

    def metric_names(self) -> tuple[str, ...]:
        return self.row.metrics

    def metric_specs(self) -> tuple[MetricSpec, ...]:
        """``--metric`` when given, else evaluate's GLUE module for a GLUE task (AX: its MNLI model's), else
        accuracy for custom classification and GLUE's STS-B pair (Pearson, Spearman) for custom regression."""
        if self.config.data.metric:
            return metrics.parse_metrics(self.config.data.metric)
        if self.preset is not None:
            return (MetricSpec("glue", config_name=self.row.trained_as or self.config.data.task_name),)
        return (MetricSpec("glue", config_name="stsb"),) if self.is_regression else (MetricSpec("accuracy"),)

    @cached_property
    def scorer(self) -> metrics.LabelScorer:
        return metrics.LabelScorer(self.metric_specs(), order=self.row.metrics)

    def load_metrics(self) -> None:
        self.scorer  # noqa: B018 (loads the modules)

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        if self.preset is None or head_labels(self.checkpoint) is not None:
            # only then do scores depend on the data: custom labels (classes or scores?), a trained head's order
            self.resolve_labels()
        preds = self.dataset_label_ids(metrics.predicted_labels(prediction.predictions, self.is_regression))
        labels = self.dataset_label_ids(np.asarray(prediction.label_ids))
        results = self.scorer(preds, labels)
        # Counted from the gathered predictions, so a distributed run shows what it really scored.
        results["examples"] = int(len(labels))
        return results

    def dataset_label_ids(self, model_ids: np.ndarray) -> np.ndarray:
        """Model label ids back in the dataset's numbering, so that F1's positive class is the dataset's."""
        if self.is_regression or self.label_to_model_id is None:
            return model_ids
        to_dataset = {model_id: data_id for data_id, model_id in self.label_to_model_id.items()}
        return np.vectorize(to_dataset.__getitem__)(model_ids)

    def prediction_records(self, raw: Dataset, output: PredictionOutput) -> list[dict[str, Any]]:
        self.resolve_labels()
        preds = metrics.predicted_labels(output.predictions, self.is_regression)
        confidence = None if self.is_regression else predicted_probability(output.predictions)
        model_to_name = self.model_label_names()
        records = []
        for i, row in enumerate(raw.select(range(len(preds)))):
            record = {"index": row.get("idx", i), self.text_column: row[self.text_column]}
            if self.text_pair_column:
                record[self.text_pair_column] = row[self.text_pair_column]
            label = row.get(self.label_column)
            if self.is_label(label):
                record["label"] = self.label_name(label)
            record["prediction"] = float(preds[i]) if self.is_regression else model_to_name[int(preds[i])]
            if confidence is not None:
                record["confidence"] = float(confidence[i])
            records.append(record)
        return records

    def is_label(self, value: Any) -> bool:
        """Whether a raw label cell holds a label (None, and -1 when it is no class, mean "unlabelled")."""
        if value is None or self.is_regression:
            return value is not None
        return value in self.label_values if self.labels_are_values else value != -1

    def label_name(self, value: Any) -> Any:
        """A row's label as the user knows it: the ClassLabel name, or the custom value itself."""
        if self.is_regression:
            return value
        if self.labels_are_values:
            # the class's own value: a test column with empty cells is read as floats (3.0 is class 3)
            return self.label_values[self.label_values.index(value)]
        return self.label_values[int(value)]

    def model_label_names(self) -> list[Any]:
        """Model output id -> label (the custom value itself, e.g. the int 5 for stars 1..5)."""
        if self.is_regression:
            return []
        if self.label_to_model_id is None:
            return list(self.label_values)
        names: list[Any] = [None] * len(self.label_values)
        for data_id, model_id in self.label_to_model_id.items():
            names[model_id] = self.label_values[data_id]
        return names
