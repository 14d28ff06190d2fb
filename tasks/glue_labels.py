"""Labels of the glue family: how dataset labels become model label ids, the class-weighted loss, the
label names of an existing head, and the tokenization of a batch with its labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from finetune.errors import FinetuneError
from finetune.task import FinetuneTrainer


def class_weights(setting: str, label_ids: np.ndarray, names: list[str]) -> list[float]:
    """One loss weight per label (dataset order) from ``auto`` or ``w1,w2,...``.

    ``auto`` is sklearn's "balanced" weighting, n / (k * count): inverse frequency, normalised so that the
    mean weight over the training examples is 1 (the loss keeps its scale, so the learning rate still fits).
    """
    if setting.strip() == "auto":
        counts = np.bincount(label_ids.astype(int), minlength=len(names))
        if (counts == 0).any():
            missing = names[int(np.flatnonzero(counts == 0)[0])]
            raise FinetuneError(f"class_weights auto: label '{missing}' has no training example; give the weights")
        return [float(w) for w in counts.sum() / (len(names) * counts)]
    try:
        weights = [float(part) for part in setting.split(",")]
    except ValueError:
        raise FinetuneError(f"class_weights must be 'auto' or numbers w1,w2,..., not '{setting}'") from None
    if len(weights) != len(names):
        raise FinetuneError(
            f"class_weights has {len(weights)} weight(s) but the data has {len(names)} labels ({', '.join(names)})"
        )
    if any(w < 0 or not np.isfinite(w) for w in weights) or not any(weights):
        raise FinetuneError(f"class_weights must be finite, non-negative and not all zero: {setting}")
    return weights


class WeightedLossTrainer(FinetuneTrainer):
    """The classification Trainer with a class-weighted cross-entropy (``--class_weights``)."""

    # compute_loss returns one micro-batch's weighted mean, as the model's own loss is a micro-batch mean: the
    # Trainer divides it by the gradient accumulation steps, so accumulation means what it means without weights.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, class_weights: torch.Tensor, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        weight = self.class_weights.to(logits.device)
        loss = F.cross_entropy(logits.float().view(-1, weight.numel()), labels.view(-1), weight=weight)
        return (loss, outputs) if return_outputs else loss


def predicted_probability(logits: np.ndarray | tuple) -> np.ndarray:
    """Softmax probability of the predicted class (run reports rank mistakes by it)."""
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted.max(axis=-1) / shifted.sum(axis=-1)


def head_labels(checkpoint: PretrainedConfig) -> list[str] | None:
    """Label names of a checkpoint's classification head (LABEL_i when unnamed), or None if it has none."""
    architectures = checkpoint.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return None
    return [str(checkpoint.id2label[i]) for i in sorted(checkpoint.id2label)]


def filled_texts(batch: dict[str, list], columns: list[str]) -> dict[str, list]:
    return {c: ["" if text is None else text for text in batch[c]] for c in columns}


@dataclass(frozen=True)
class LabelEncoding:
    """How dataset labels become the model's label ids (floats for regression)."""

    is_regression: bool
    #: class id -> label (ClassLabel name or custom value)
    classes: tuple[Any, ...]
    #: the column holds the label values (looked up in ``classes``), not class ids
    by_value: bool
    to_model_id: dict[int, int] | None

    def __call__(self, values: list) -> list:
        if self.is_regression:
            return [float(v) for v in values]
        if self.by_value:
            index = {value: i for i, value in enumerate(self.classes)}
            values = [index[v] for v in values]
        mapping = self.to_model_id or {}
        return [mapping.get(int(v), int(v)) for v in values]


def encode_batch(
    batch: dict[str, list],
    tokenizer,
    columns: tuple[str, str | None, str],
    max_length: int,
    padding: str | bool,
    labels: LabelEncoding,
) -> dict[str, list]:
    """Token ids for a batch of single sentences or sentence pairs, plus ``labels`` where present."""
    text, pair, label = columns
    texts = (batch[text],) if pair is None else (batch[text], batch[pair])
    encoded = tokenizer(*texts, truncation=True, max_length=max_length, padding=padding)
    if label in batch:
        encoded["labels"] = labels(batch[label])
    return encoded
