"""How examples are put into batches: length-sorted training batches, evaluation in dataset order.

Padding is wasted compute; sorting by length before batching removes most of it. transformers'
``LengthGroupedSampler`` sorts within random windows of up to 50 batches; ``LengthBucketSampler`` can sort
the whole training set (ties broken at random) and then shuffle the order of the batches, which leaves
almost no padding while every epoch still sees its batches in a new order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import Sampler, SequentialSampler
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PredictionOutput


class LengthBucketSampler(LengthGroupedSampler):
    """Indices in batches of similar length, sorted over windows of ``window`` batches (0: all of them).

    The longest batch comes first (an out-of-memory error shows at once); the other full batches follow
    in random order, and a last, partial batch stays last so the DataLoader cuts the same batches.
    A subclass of ``LengthGroupedSampler``, so callbacks that reseed it per epoch still find it.
    """

    def __init__(self, batch_size: int, lengths: list[int], window: int = 0, generator=None):
        super().__init__(batch_size, lengths=lengths, generator=generator)
        self.window = window

    def __iter__(self) -> Iterator[int]:
        batches_total = -(-len(self.lengths) // self.batch_size)
        window = batches_total if self.window <= 0 else min(self.window, batches_total)
        order = get_length_grouped_indices(self.lengths, self.batch_size, window, generator=self.generator)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # get_length_grouped_indices puts the longest example first, so batches[0] is the longest batch.
        last = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < self.batch_size else []
        head, rest = batches[:1], batches[1:]
        shuffled = [rest[i] for i in torch.randperm(len(rest), generator=self.generator).tolist()]
        return iter([i for batch in head + shuffled + last for i in batch])


class FinetuneSampling:
    """Trainer mixin: length-bucketed training batches on request, evaluation batches in dataset order.

    With ``train_sampling_strategy="group_by_length"`` transformers also groups *evaluation* batches by
    length, in a random order, so ``predict`` would return predictions shuffled against the rows they
    belong to (metrics stay right, prediction files and submissions would not). Here evaluation keeps the
    dataset's order; callers that want length-sorted evaluation sort the rows themselves and restore the
    order afterwards.
    """

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        window = getattr(self.args, "group_by_length_window", None)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or window is None or dataset is None:
            return super()._get_train_sampler(train_dataset)
        name = self.processing_class.model_input_names[0] if self.processing_class is not None else "input_ids"
        lengths = [len(ids) for ids in dataset[name]]
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthBucketSampler(batch, lengths, window)

    def _get_eval_sampler(self, eval_dataset: Dataset) -> Sampler | None:
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        # Distributed: None lets accelerate shard the dataset in order and gather it back in order.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def longest_first_order(dataset: Dataset) -> np.ndarray:
    """Row indices sorted by length, longest first (stable): consecutive rows make batches of similar length."""
    return np.argsort([-len(ids) for ids in dataset["input_ids"]], kind="stable")


def longest_first(dataset: Dataset) -> Dataset:
    """The rows sorted by length, longest first: evaluation batches pad (and generate) less; a batch that
    does not fit in memory shows at once. For metrics that do not depend on the row order."""
    return dataset.select(longest_first_order(dataset))


def in_row_order(output: PredictionOutput, order: np.ndarray) -> PredictionOutput:
    """Predictions made on ``dataset.select(order)`` put back in the dataset's own row order."""
    restore = np.argsort(order)

    def reorder(values: Any) -> Any:
        if values is None:
            return None
        if isinstance(values, tuple):
            return tuple(reorder(v) for v in values)
        return np.asarray(values)[restore]

    return PredictionOutput(reorder(output.predictions), reorder(output.label_ids), output.metrics)
