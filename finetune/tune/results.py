"""What `finetune tune` leaves: the results table and plot, and the best settings as a recipe."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from finetune.config import CONFIG_SECTIONS, RunConfig, recipe_path
from finetune.errors import FinetuneError
from finetune.tune.space import hp_space

RESULTS_CSV = "tune_results.csv"
RESULTS_MD = "tune_results.md"
PLOT_FILE = "tune_trials.png"
BEST_RECIPE = "best_recipe.yaml"
#: Settings a recipe written by the search never carries: where this search wrote, and secrets.
NOT_IN_RECIPE = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir")

@dataclass
class TuneResult:
    output_dir: Path
    best_value: float
    best_params: dict[str, Any]
    finished: int
    files: list[Path]


# ---------------------------------------------------------------------------------------------------------
# Results: table, plot, best recipe
# ---------------------------------------------------------------------------------------------------------


PARAM_COLUMNS = ("learning_rate", "per_device_train_batch_size", "num_train_epochs", "warmup_steps", "weight_decay")


def trial_rows(study: Any, config: RunConfig) -> list[dict[str, Any]]:
    """One row per trial: state, score (mean over seeds), std, per-seed scores, settings, minutes."""
    fixed = hp_space(config.tune)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        settings = fixed(_Fixed(trial.params))
        seeds = trial.user_attrs.get("seed_scores", [])
        duration = trial.duration.total_seconds() / 60 if trial.duration else None
        rows.append({
            "trial": trial.number,
            "state": "interrupted" if trial.user_attrs.get("interrupted") else trial.state.name.lower(),
            "score": trial.value,
            "std": float(np.std(seeds)) if len(seeds) > 1 else None,
            "seed_scores": " ".join(f"{s:.4f}" for s in seeds),
            **{k: settings[k] for k in PARAM_COLUMNS},
            "minutes": round(duration, 2) if duration is not None else None,
        })
    return rows


class _Fixed:
    """A stand-in trial that answers hp_space with a finished trial's parameters (fixed ranges stay fixed)."""

    def __init__(self, params: dict[str, Any]):
        self.params = params

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return self.params.get(name, math.nan)

    def suggest_categorical(self, name: str, choices: list[int]) -> Any:
        return self.params.get(name)


def write_results(
    rows: list[dict[str, Any]], finished: int, config: RunConfig, recipe_document: dict, metric: str, out: Path
) -> TuneResult:
    from finetune.plots import tune_trials

    completed = [row for row in rows if row["state"] == "complete" and row["score"] is not None]
    if not completed:
        raise FinetuneError(f"no trial of the search in {out} completed; nothing to recommend")
    maximize = bool(config.training.greater_is_better)
    best = (max if maximize else min)(completed, key=lambda row: row["score"])
    files = [write_csv(rows, out / RESULTS_CSV), write_markdown(rows, best["trial"], metric, config, out / RESULTS_MD)]
    plot = tune_trials(rows, metric, maximize, out / PLOT_FILE)
    if plot is not None:
        files.append(plot)
    settings = {k: best[k] for k in PARAM_COLUMNS}
    files.append(write_best_recipe(recipe_document, settings, best, metric, config, out / BEST_RECIPE))
    return TuneResult(out, best["score"], settings, finished, files)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_markdown(rows: list[dict[str, Any]], best: int, metric: str, config: RunConfig, path: Path) -> Path:
    seeds = config.tune.tune_seeds
    header = ["trial", f"{metric} (mean of {seeds} seed{'s' if seeds > 1 else ''})", "std", "per seed",
              "learning rate", "batch", "epochs", "warmup", "weight decay", "state", "minutes"]

    def shown(value: Any, digits: str = ".4f") -> str:
        return "" if value is None else format(value, digits) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mark = " (best)" if row["trial"] == best else ""
        lines.append("| " + " | ".join([
            f"{row['trial']}{mark}", shown(row["score"]), shown(row["std"]), row["seed_scores"],
            shown(row["learning_rate"], ".3g"), shown(row["per_device_train_batch_size"]),
            shown(row["num_train_epochs"]), shown(row["warmup_steps"], ".3f"), shown(row["weight_decay"], ".3f"),
            row["state"], shown(row["minutes"], ".1f"),
        ]) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe_of(config: RunConfig) -> dict[str, Any]:
    """The run's recipe as a document: the recipe file's sections plus every setting given on the command line."""
    document: dict[str, Any] = {}
    if config.recipe:
        document = yaml.safe_load(recipe_path(str(config.recipe)).read_text()) or {}
    document.pop("tune", None)
    for key in sorted(config.explicit):
        section = next((name for name, cls in CONFIG_SECTIONS.items() if key in cls.__dataclass_fields__), None)
        if section in (None, "tune") or key in NOT_IN_RECIPE or "token" in key:
            continue
        value = getattr(getattr(config, section), key)
        document.setdefault(section, {})[key] = value.value if isinstance(value, Enum) else value
    return document


def write_best_recipe(
    document: dict[str, Any], settings: dict[str, Any], best: dict[str, Any], metric: str, config: RunConfig,
    path: Path,
) -> Path:
    training = {**document.get("training", {}), **settings}
    recipe = {**document, "training": training}
    seeds = config.tune.tune_seeds
    spread = f" +- {best['std']:.4f}" if best["std"] is not None else ""
    source = f" (search from recipe {config.recipe})" if config.recipe else ""
    header = [
        f"# {config.data.task} {config.data.task_name or ''} with {config.model.model_name_or_path}: settings found by "
        f"finetune tune{source}",
        f"# trial {best['trial']}: validation {metric} {best['score']:.4f}{spread}, mean of {seeds} seed(s) from "
        f"seed {config.training.seed}; searched {config.tune.n_trials} trials ({config.tune.backend})",
    ]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path
