"""Summarization and translation share this: text-to-text fine-tuning of three kinds of model.

* ``encoding``: which kind a checkpoint is, where rows keep their texts, and the tokenizing functions;
* ``trainer``: the Seq2SeqTrainer that generates in evaluation (decoder-only: from the prompt alone);
* ``task``: ``GenerationTask``, the base of the family modules in ``finetune.tasks``.
"""

from finetune.generation.encoding import (
    IGNORE_INDEX,
    Encoding,
    ModelKind,
    TextColumns,
    encode_batch,
    model_kind,
    prompt_around_source,
)
from finetune.generation.task import GenerationTask
from finetune.generation.trainer import GenerationTrainer, left_padded_prompts, seq2seq_arguments

__all__ = [
    "IGNORE_INDEX",
    "Encoding",
    "GenerationTask",
    "GenerationTrainer",
    "ModelKind",
    "TextColumns",
    "encode_batch",
    "left_padded_prompts",
    "model_kind",
    "prompt_around_source",
    "seq2seq_arguments",
]
