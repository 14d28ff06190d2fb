"""The search of `finetune tune`: trials of k seeds through Trainer.hyperparameter_search (optuna or Ray)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from transformers import Trainer

from finetune.callbacks import EpochSeededSampler, NonFiniteLoss, StopOnNonFiniteLoss
from finetune.config import RunConfig
from finetune.errors import FinetuneError
from finetune.pipeline import build_task, eval_dataset_arg, tokenized_splits, trainable_model
from finetune.tune.results import PARAM_COLUMNS, TuneResult, recipe_of, trial_rows, write_results
from finetune.tune.space import check_space, hp_space, ray_space, space_signature

STUDY_FILE = "tune.db"
RAY_FOLDER = "ray"
#: The pruner compares the n-th evaluation of seed i across trials, reported as step i * REPORTS_PER_SEED + n.
REPORTS_PER_SEED = 10_000



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
# The search
# ---------------------------------------------------------------------------------------------------------




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


