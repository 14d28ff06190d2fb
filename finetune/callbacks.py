"""Trainer callbacks that every run gets."""

from __future__ import annotations

from transformers import TrainerCallback

from finetune.config import RunConfig


def default_callbacks(config: RunConfig) -> list[TrainerCallback]:
    return []
