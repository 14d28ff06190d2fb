"""Tokens live in memory only: arguments that carry one never pickle it.

Its own module, so that every kind of training arguments (``config.TrainConfig``, the generation tasks'
``Seq2SeqTrainingArguments``) can use it without importing the config module.
"""

from __future__ import annotations

from typing import Any


class TokensNotPickled:
    """Arguments whose pickle leaves every ``*_token`` field (``hub_token``) out, as None.

    The Trainer pickles its arguments into ``training_args.bin`` in the run folder and in every checkpoint
    (``torch.save``), and hub_strategy every_save/checkpoint/all_checkpoints uploads those folders. The token
    is needed in memory only, for the Hub calls; ``TrainingArguments.to_dict`` (the saved config) already
    redacts the same fields.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {name: None if name.endswith("_token") else value for name, value in self.__dict__.items()}
