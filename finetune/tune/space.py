"""The search space of `finetune tune`: the `tune:` section as optuna and Ray Tune distributions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune.config import RunConfig, TuneConfig
from finetune.errors import FinetuneError


def check_space(space: TuneConfig) -> None:
    """One-line errors for a space optuna would reject with a traceback (or silently misuse)."""
    if space.n_trials < 1 or space.tune_seeds < 1:
        raise FinetuneError("n_trials and tune_seeds must be at least 1")
    for name in ("learning_rate_range", "warmup_range", "weight_decay_range"):
        values = [float(v) for v in getattr(space, name)]
        if len(values) not in (1, 2) or values != sorted(values):
            raise FinetuneError(f"{name} must be one value or 'low high' with low <= high, not {values}")
        if min(values) < 0 or (name == "learning_rate_range" and min(values) <= 0):
            raise FinetuneError(f"{name} must be positive: {values}")
    if float(space.warmup_range[-1]) >= 1:
        raise FinetuneError("warmup_range is a fraction of the training steps: below 1")
    for name in ("batch_sizes", "epoch_choices"):
        values = getattr(space, name)
        if not values or any(int(v) < 1 for v in values):
            raise FinetuneError(f"{name} must be one or more positive integers, not {values}")
    if space.pruner not in ("median", "none"):
        raise FinetuneError(f"pruner must be median or none, not '{space.pruner}'")


def hp_space(space: TuneConfig) -> Callable[[Any], dict[str, Any]]:
    """trial -> TrainingArguments values; a range of one value is fixed (not searched)."""

    def ranged(trial, name: str, bounds: list[float], log: bool = False) -> float:
        low, high = float(bounds[0]), float(bounds[-1])
        return low if low == high else trial.suggest_float(name, low, high, log=log)

    def chosen(trial, name: str, choices: list[int]) -> int:
        choices = [int(c) for c in choices]
        return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)

    def sample(trial) -> dict[str, Any]:
        # LoRA r/alpha (not searched yet): sample them here as "lora_r"/"lora_alpha" and
        # apply them in the search's model_init, which receives the trial; they are not TrainingArguments, and
        # the Trainer skips (with a warning) any returned key that is not one.
        return {
            "learning_rate": ranged(trial, "learning_rate", space.learning_rate_range, log=True),
            "per_device_train_batch_size": chosen(trial, "per_device_train_batch_size", space.batch_sizes),
            "num_train_epochs": chosen(trial, "num_train_epochs", space.epoch_choices),
            "warmup_steps": ranged(trial, "warmup_steps", space.warmup_range),
            "weight_decay": ranged(trial, "weight_decay", space.weight_decay_range),
        }

    return sample


def ray_space(space: TuneConfig) -> Callable[[Any], dict[str, Any]]:
    """The same space as Ray Tune distributions (the Trainer calls it once, with no trial)."""
    from ray import tune as ray_tune

    def ranged(bounds: list[float], log: bool = False) -> Any:
        low, high = float(bounds[0]), float(bounds[-1])
        return low if low == high else (ray_tune.loguniform if log else ray_tune.uniform)(low, high)

    def chosen(choices: list[int]) -> Any:
        choices = [int(c) for c in choices]
        return choices[0] if len(choices) == 1 else ray_tune.choice(choices)

    def sample(_: Any) -> dict[str, Any]:
        return {
            "learning_rate": ranged(space.learning_rate_range, log=True),
            "per_device_train_batch_size": chosen(space.batch_sizes),
            "num_train_epochs": chosen(space.epoch_choices),
            "warmup_steps": ranged(space.warmup_range),
            "weight_decay": ranged(space.weight_decay_range),
        }

    return sample


def space_signature(config: RunConfig) -> dict[str, Any]:
    """What a resumed study must share with the one on disk (the budget n_trials may change)."""
    space = {k: v for k, v in vars(config.tune).items() if k not in ("n_trials", "study_name")}
    return {**space, "seed": config.training.seed, "metric": config.training.metric_for_best_model}


