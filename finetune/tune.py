"""`finetune tune`: hyperparameter search with optuna, through ``Trainer.hyperparameter_search``.

The search runs in this process. The study lives in ``output_dir/tune.db`` (sqlite), so a search that was
killed resumes where it stopped when the same command runs again: finished trials are kept, the trial that
was running is marked failed and its settings are tried first, and only the missing trials run.

One trial = one set of hyperparameters, trained ``tune_seeds`` times (seeds seed, seed+1, ...) inside the
trial's ``train`` call (``SeedMean``); it scores the mean of the seeds' best evaluations. Each evaluation is
also reported to optuna's pruner, which stops a trial whose curve is below the median of earlier trials.
The search writes a results table (``tune_results.md``/``.csv``), a plot (``tune_trials.png``) and the best
settings as a recipe (``best_recipe.yaml``) that ``finetune train best_recipe.yaml`` runs.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from transformers import Trainer

from finetune.callbacks import EpochSeededSampler, NonFiniteLoss, StopOnNonFiniteLoss
from finetune.config import CONFIG_SECTIONS, RunConfig, TuneConfig, recipe_path
from finetune.errors import FinetuneError
from finetune.pipeline import build_task, eval_dataset_arg, tokenized_splits, trainable_model

STUDY_FILE = "tune.db"
RAY_FOLDER = "ray"
RESULTS_CSV = "tune_results.csv"
RESULTS_MD = "tune_results.md"
PLOT_FILE = "tune_trials.png"
BEST_RECIPE = "best_recipe.yaml"
#: The pruner compares the n-th evaluation of seed i across trials, reported as step i * REPORTS_PER_SEED + n.
REPORTS_PER_SEED = 10_000
#: Settings a recipe written by the search never carries: where this search wrote, and secrets.
NOT_IN_RECIPE = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir")


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise FinetuneError("finetune tune needs optuna: pip install 'finetune[tune]'") from None
    return optuna


# ---------------------------------------------------------------------------------------------------------
# The trial: k seeds inside one Trainer.train call
# ---------------------------------------------------------------------------------------------------------


class SeedMean:
    """Trainer mixin: under a search, ``train(trial=...)`` trains once per seed and leaves the seeds' mean score.

    ``hyperparameter_search``'s optuna objective calls ``train(trial=trial)`` once and returns ``self.objective``.
    Training k times inside that call keeps one optuna trial per set of hyperparameters: the sampler, the
    pruner and the sqlite study see one value per setting. The Trainer applies the hp_space on every ``train``
    call, and optuna returns a trial's earlier suggestion for a name it has already sampled, so every seed
    trains with the same settings; ``model_init`` runs after ``set_seed(args.seed)``, so the new head and the
    data order follow the seed.
    """

    tune_seeds: tuple[int, ...] = ()
    _seed_position = 0
    _evaluations = 0

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs: Any):
        if trial is None or not self.tune_seeds:
            return super().train(resume_from_checkpoint, trial, **kwargs)
        scores: list[float] = []
        for position, seed in enumerate(self.tune_seeds):
            self.args.seed = seed
            self._seed_position, self._evaluations = position, 0
            output = super().train(resume_from_checkpoint, trial, **kwargs)
            scores.append(self.seed_score())
            trial.set_user_attr("seed_scores", scores)
        self.objective = float(np.mean(scores))
        return output

    def seed_score(self) -> float:
        """The seed's best evaluation: the model ``finetune train`` would keep (load_best_model_at_end)."""
        return float(self.state.best_metric if self.state.best_metric is not None else self.objective)

    def _report_to_hp_search(self, trial, step: int, metrics: dict[str, float]) -> None:
        # Trials differ in batch size (steps per epoch) and train several seeds, so global steps do not line up
        # across trials; the pruner compares the same seed's n-th evaluation instead.
        self._evaluations += 1
        super()._report_to_hp_search(trial, self._seed_position * REPORTS_PER_SEED + self._evaluations, metrics)


def averaging_seeds(trainer: Trainer, seeds: tuple[int, ...]) -> Trainer:
    """The task's own Trainer (its class is the task's choice: plain, class-weighted, ...) with SeedMean mixed in."""
    trainer.__class__ = type(f"SeedMean{type(trainer).__name__}", (SeedMean, type(trainer)), {})
    trainer.tune_seeds = seeds
    return trainer


# ---------------------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    output_dir: Path
    best_value: float
    best_params: dict[str, Any]
    finished: int
    files: list[Path]


def tune(config: RunConfig) -> TuneResult:
    """Run (or resume) the search of ``config.tune`` on the config's task; write the report and best recipe."""
    check_space(config.tune)
    backend = require_backend(config.tune.backend)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError("finetune tune runs in one process; start it without accelerate launch / torchrun")
    task = build_task(config)
    if task.family != "glue":
        raise FinetuneError(f"finetune tune supports classification (glue family) tasks, not {task.family} yet")
    recipe_document = recipe_of(config)  # before the search changes settings for its trials
    # A trial needs its best score, not its model: the Trainer tracks best_metric without checkpoints. New
    # arguments (see RunConfig.replace_training); the Trainer gets its own copy, which the search edits per trial.
    changes: dict[str, Any] = {"save_strategy": "no", "load_best_model_at_end": False}
    if "output_dir" not in config.explicit:
        changes["output_dir"] = f"{config.training.output_dir}-tune"
    config.replace_training(**changes)
    args = config.training
    out = Path(args.output_dir)
    check_tune_dir(out, args.overwrite_output_dir)
    metric = args.metric_for_best_model.removeprefix("eval_")

    raw, tokenized, tokenizer = tokenized_splits(task, config)
    eval_splits = task.eval_splits(raw)
    if "train" not in tokenized or not eval_splits:
        raise FinetuneError("finetune tune needs a train and a validation split to score trials on")

    def model_init(trial=None):
        return trainable_model(task.load_model(tokenizer), config)  # with a fresh LoRA adapter under use_peft

    trainer = task.build_trainer(
        None, tokenizer, tokenized["train"], eval_dataset_arg(tokenized, eval_splits), trial_callbacks(config),
        model_init=model_init,
    )
    out.mkdir(parents=True, exist_ok=True)
    name = config.tune.study_name or Path(str(config.recipe or config.data.task_name or "study")).stem
    search = optuna_search if config.tune.backend == "optuna" else ray_search
    rows, finished = search(backend, trainer, config, metric, out, name)
    return write_results(rows, finished, config, recipe_document, metric, out)


def require_backend(name: str) -> Any:
    """The search library's module, or a one-line error naming the extra that installs it."""
    if name == "optuna":
        return require_optuna()
    try:
        import ray.tune
    except ImportError:
        raise FinetuneError("finetune tune --backend ray needs Ray Tune: pip install 'finetune[ray]'") from None
    return ray.tune


def optuna_search(
    optuna: Any, trainer: Trainer, config: RunConfig, metric: str, out: Path, name: str
) -> tuple[list[dict[str, Any]], int]:
    """The optuna study in out/tune.db, resumed or created, run to n_trials; (table rows, finished trials)."""
    args = config.training
    seeds = tuple(args.seed + i for i in range(config.tune.tune_seeds))  # (the Trainer's copy changes per seed)
    averaging_seeds(trainer, seeds)
    storage = optuna.storages.RDBStorage(f"sqlite:///{out.resolve() / STUDY_FILE}")
    direction = "maximize" if args.greater_is_better else "minimize"
    study = open_study(optuna, storage, name, direction, space_signature(config))
    remaining = config.tune.n_trials - len(finished_trials(study))
    if remaining > 0:
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=2) if config.tune.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        trainer.hyperparameter_search(
            hp_space=hp_space(config.tune),
            compute_objective=lambda metrics: metrics[f"eval_{metric}"],
            n_trials=remaining,
            direction=direction,
            backend="optuna",
            hp_name=lambda trial: f"trial-{trial.number}",
            # optuna.create_study: the sqlite study in output_dir, loaded again by a resumed search
            storage=storage,
            study_name=name,
            load_if_exists=True,
            # seeded by the trials so far: a resumed search does not draw the first trials' settings again
            sampler=optuna.samplers.TPESampler(seed=args.seed + len(study.trials)),
            pruner=pruner,
            catch=(NonFiniteLoss,),  # a diverging setting fails its trial, not the search
        )
    study = optuna.load_study(study_name=name, storage=storage)
    return trial_rows(study, config), len(finished_trials(study))


def ray_search(
    ray_tune: Any, trainer: Trainer, config: RunConfig, metric: str, out: Path, name: str
) -> tuple[list[dict[str, Any]], int]:
    """The same search on Ray Tune (``ray.init`` reads RAY_ADDRESS, so a cluster runs the trials); one seed per
    trial; the experiment in out/ray/<name> is resumed by the same command."""
    args = config.training
    maximize = bool(args.greater_is_better)
    scheduler = None
    if config.tune.pruner == "median":
        scheduler = ray_tune.schedulers.MedianStoppingRule(
            metric="objective", mode="max" if maximize else "min", min_samples_required=2
        )
    # A trial scores its best evaluation (as with optuna), not its last one.
    os.environ.setdefault("RAY_SCOPE", "all")
    best = trainer.hyperparameter_search(
        hp_space=ray_space(config.tune),
        compute_objective=lambda metrics: metrics[f"eval_{metric}"],
        n_trials=config.tune.n_trials,
        direction="maximize" if maximize else "minimize",
        backend="ray",
        # ray.tune.run: the experiment folder, resumed when it exists
        storage_path=str((out / RAY_FOLDER).resolve()),
        name=name,
        resume="AUTO",
        scheduler=scheduler,
        verbose=1,
    )
    rows = []
    for number, trial in enumerate(best.run_summary.trials):
        scores = trial.metric_analysis.get("objective", {})
        score = scores.get("max" if maximize else "min")
        settings = {k: trial.config.get(k) for k in PARAM_COLUMNS}
        seconds = (trial.last_result or {}).get("time_total_s")
        rows.append({
            "trial": number, "state": "complete" if trial.status == "TERMINATED" and score is not None else
            trial.status.lower(), "score": score, "std": None, "seed_scores": "", **settings,
            "minutes": round(seconds / 60, 2) if seconds else None,
        })
    return rows, sum(row["state"] == "complete" for row in rows)


def trial_callbacks(config: RunConfig) -> list:
    """The run callbacks a trial needs: the seeded batch order and the NaN stop. A trial saves no checkpoints,
    and SIGTERM ends the search as it is (the study resumes), so CompleteCheckpoints/CheckpointOnSigterm stay out."""
    callbacks = [EpochSeededSampler(), StopOnNonFiniteLoss()]
    if config.training.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        if config.training.early_stopping_patience < 1:
            raise FinetuneError("early_stopping_patience must be at least 1")
        # A trial scores its best evaluation, so it needs no best checkpoint to stop early.
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.training.early_stopping_patience))
    return callbacks


def check_tune_dir(out: Path, overwrite: bool) -> None:
    holds_search = (out / STUDY_FILE).is_file() or (out / RAY_FOLDER).is_dir()
    if out.is_dir() and any(out.iterdir()) and not holds_search and not overwrite:
        raise FinetuneError(
            f"output_dir {out} is not empty and holds no search ({STUDY_FILE} or {RAY_FOLDER}/); pass "
            "--overwrite_output_dir or another --output_dir"
        )


def open_study(optuna: Any, storage: Any, name: str, direction: str, signature: dict[str, Any]) -> Any:
    """The study in storage (created if new), with trials left running by a killed search marked failed."""
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", signature)
    elif saved != signature:
        raise FinetuneError(
            f"study '{name}' in {STUDY_FILE} searched another space or metric ({saved}); use another --output_dir "
            "or --study_name"
        )
    study_id = storage.get_study_id_from_name(name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # One search per study (tune refuses several processes), so a RUNNING trial is one a kill interrupted.
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)  # its settings run again first
    return study


def finished_trials(study: Any) -> list[Any]:
    """Trials that count against n_trials: completed, pruned, or failed by themselves (not interrupted)."""
    from optuna.trial import TrialState

    return [
        t for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))
    ]


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
