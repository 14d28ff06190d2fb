"""The Task contract: what a task family provides to the one training pipeline.

A family (GLUE classification, summarization, translation) is one module in ``tasks/`` holding a
``Task`` subclass and a table of presets. Its lifecycle is explicit:

* built from the parsed config, a Task resolves what the config alone says: the preset and the columns;
* what the checkpoint says (the kind of model, an existing classification head) comes from its config
  (``AutoConfig``, no weights), read once, when a hook first needs it: :attr:`Task.checkpoint`;
* what only the data says (GLUE's label set) is learned by ``load_raw_datasets``; the hooks that need it
  read the data themselves (from the datasets cache) when it has not run.

Each hook takes what it works on and returns its result, so hooks can be called alone and in any order:

    load_tokenizer() -> tokenizer              load_raw_datasets() -> raw splits
    tokenize(raw, tokenizer) -> tokenized      load_model(tokenizer) -> model
    build_trainer(model, tokenizer, train, eval, callbacks) -> Trainer
    predict(trainer, tokenized split, name) -> output       prediction_records(raw split, output) -> records
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from datasets import Dataset, DatasetDict
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import PredictionOutput

from finetune import metrics, modeling
from finetune.batching import FinetuneSampling, in_row_order, longest_first, longest_first_order
from finetune.compile import RegionalCompileMixin
from finetune.distributed import FsdpTrainerMixin
from finetune.errors import FinetuneError
from finetune.frozen_weights import FrozenWeightsMixin
from finetune.precision import accelerator_kind

if TYPE_CHECKING:  # config imports the task registry to resolve settings at parse time
    from finetune.config import RunConfig


def pad_multiple(config: RunConfig) -> int | None:
    """What batches are padded to a multiple of: 8 under mixed precision on a GPU, whose tensor cores take
    matrices in multiples of 8; none on a CPU, where bf16 kernels do not need it and padding is only extra
    work (BENCHMARKS.md 'Precision')."""
    args = config.training
    mixed = bool(args.fp16 or args.bf16) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") in ("fp16", "bf16")
    return 8 if mixed and not args.use_cpu and accelerator_kind() is not None else None


class FinetuneTrainer(FrozenWeightsMixin, RegionalCompileMixin, FsdpTrainerMixin, FinetuneSampling, Trainer):
    """The Trainer of classification tasks: finetune's batching (``finetune.batching``), FSDP fixes
    (``finetune.distributed``), regional compilation (``finetune.compile``), LoRA's frozen weights in bf16
    (``finetune.frozen_weights``)."""


class Task(ABC):
    """One task family, configured for one run."""

    family: ClassVar[str]
    #: preset name -> the family's description of it (columns, dataset, metrics, ...)
    presets: ClassVar[Mapping[str, Any]]
    #: the pipeline tag the Hub uses for this kind of model (model-index ``task.type``)
    hub_task_type: ClassVar[str]
    #: whether ``--class_weights`` (a weighted classification loss) applies to this family
    supports_class_weights: ClassVar[bool] = False

    def __init__(self, config: RunConfig):
        self.config = config
        self.preset = self.preset_named(config.data.task_name)

    @cached_property
    def checkpoint(self) -> PretrainedConfig:
        """The starting checkpoint's config (``AutoConfig``: no weights), read once."""
        return modeling.load_config(self.config.model)

    @classmethod
    def preset_named(cls, name: str | None) -> Any:
        if name is None:
            return None
        if name not in cls.presets:
            raise FinetuneError(f"unknown {cls.family} task '{name}' (known: {', '.join(cls.presets)})")
        return cls.presets[name]

    # -- data ----------------------------------------------------------------------------------------------

    @abstractmethod
    def load_raw_datasets(self) -> DatasetDict:
        """Splits as loaded, checked for the columns this task reads."""

    def eval_splits(self, raw: DatasetDict) -> list[str]:
        """Splits evaluated during and after training."""
        return [split for split in ("validation",) if split in raw]

    def predict_splits(self, raw: DatasetDict) -> list[str]:
        """Splits that ``finetune predict`` writes predictions for by default."""
        return [split for split in ("test",) if split in raw]

    # -- model and features --------------------------------------------------------------------------------

    @abstractmethod
    def load_tokenizer(self) -> PreTrainedTokenizerBase: ...

    @abstractmethod
    def load_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel: ...

    @abstractmethod
    def tokenize(self, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
        """Model inputs (and ``labels`` where the split has them), one row per raw row, same order."""

    def data_collator(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> Any:
        """Pads each batch to its longest member (to a multiple of 8 under mixed precision on a GPU)."""
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple(self.config))

    # -- training and metrics ------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def best_metric_of(cls, task_name: str | None) -> str:
        """Metric (without the ``eval_`` prefix) that picks the best checkpoint of a preset (None: custom data);
        higher is better. Known before any model or data is loaded: the config resolves it at parse time."""

    @classmethod
    def metric_names_of(cls, task_name: str | None) -> frozenset[str] | None:
        """Every metric (without ``eval_``) an evaluation of a preset reports, so that a --metric_for_best_model
        it never reports is refused at parse time, not by a KeyError after the first epoch. None: not known
        before the data is read (not checked)."""
        return None

    @property
    def best_metric(self) -> str:
        """This run's metric for the best checkpoint (where the data decides it, it may differ from the preset's;
        with ``--metric``, the first metric named)."""
        if self.config.data.metric:
            return metrics.best_metric(metrics.parse_metrics(self.config.data.metric))
        return self.best_metric_of(self.config.data.task_name)

    def metric_names(self) -> tuple[str, ...]:
        """The task's official metrics, as a model card shows them; empty: every quality metric it reports."""
        return ()

    @abstractmethod
    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]: ...

    @abstractmethod
    def load_metrics(self) -> None:
        """Load the metric modules now (once per task): a metric that cannot load stops the run before training."""

    def build_trainer(
        self,
        model: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        train_dataset: Dataset | None,
        eval_dataset: Dataset | dict[str, Dataset] | None,
        callbacks: list[TrainerCallback],
        model_init: Callable[..., PreTrainedModel] | None = None,
    ) -> Trainer:
        """The family's Trainer around a model, or around ``model_init`` (a hyperparameter search builds a fresh
        model for every trial, so it passes no model)."""
        if self.config.training.class_weights is not None and not self.supports_class_weights:
            raise FinetuneError(f"class_weights is for classification, not {self.family}")
        self.load_metrics()
        if isinstance(eval_dataset, dict):  # scores do not depend on the row order; padding does
            eval_dataset = {split: longest_first(rows) for split, rows in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = longest_first(eval_dataset)
        return self.trainer(
            model=model,
            model_init=model_init,
            data_collator=self.data_collator(tokenizer, model),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            compute_metrics=self.compute_metrics,
            callbacks=callbacks,
        )

    def trainer(self, **kwargs: Any) -> Trainer:
        """This family's Trainer class and training arguments around the common Trainer arguments."""
        if self.config.training.padding_free:
            raise FinetuneError(f"padding_free is for decoder-only models on generation tasks, not {self.family}")
        return FinetuneTrainer(args=self.config.trainer_arguments(), **kwargs)

    def predict(self, trainer: Trainer, dataset: Dataset, split: str) -> PredictionOutput:
        """Predictions (and metrics, where labels exist) for one tokenized split, in its row order; computed
        longest rows first, so that each batch pads to a length close to its rows' own."""
        order = longest_first_order(dataset)
        return in_row_order(trainer.predict(dataset.select(order), metric_key_prefix="eval"), order)

    @abstractmethod
    def prediction_records(self, raw: Dataset, output: PredictionOutput) -> list[dict[str, Any]]:
        """One JSON-able record per example: inputs, reference and prediction, with label names."""

    def predictions_file(self, split: str) -> str:
        """Name of the file in output_dir that holds one split's prediction records."""
        return f"predictions_{split}.jsonl"

    # -- description -----------------------------------------------------------------------------------------

    def dataset_id(self) -> tuple[str | None, str | None]:
        """(dataset id, config name) this run trains on, for model cards; (None, None) for local files."""
        return None, None
