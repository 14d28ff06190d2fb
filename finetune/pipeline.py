"""The one pipeline every task family runs through: train, evaluate, predict.

Data flows one way: config -> task -> tokenized datasets -> Trainer -> metrics -> files (-> Hub).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import Trainer, TrainerCallback, set_seed

from finetune import adapters, allocator, report
from finetune.callbacks import last_complete_checkpoint, preemption, release_signal_handlers
from finetune.compile import decided_compile
from finetune.config import INFERENCE_SETTINGS, RunConfig
from finetune.errors import FinetuneError, Preempted
from finetune.run_info import run_info
from finetune.task import Task
from finetune.tasks import task_class

METRICS_FILE = "metrics.json"
logger = logging.getLogger("finetune")


def build_task(config: RunConfig) -> Task:
    return task_class(config.data.task)(config)


def resume_checkpoint(config: RunConfig) -> str | None:
    """The checkpoint to resume from: a path as given, or the newest in output_dir for ``last``.

    A given path was checked when the config was built (finetune.validation): a folder with trainer_state.json,
    without which the Trainer would load the weights and silently start again from step 0.
    """
    wanted = config.training.resume_from_checkpoint
    if wanted == "last":
        found = last_complete_checkpoint(config.training.output_dir)
        if found is None:
            raise FinetuneError(f"resume_from_checkpoint=last: no complete checkpoint in {config.training.output_dir}")
        return found
    return wanted


def check_output_dir(config: RunConfig) -> None:
    """Refuse to write into a non-empty output_dir unless told to overwrite or resume."""
    args = config.training
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir and args.resume_from_checkpoint is None:
        raise FinetuneError(
            f"output_dir {out} is not empty; pass --overwrite_output_dir, --resume_from_checkpoint last, "
            "or another --output_dir"
        )


def settings_from_data(config: RunConfig, task: Task, eval_splits: list[str]) -> dict[str, Any]:
    """Training settings that only the loaded data decides; everything else is final at parse time.

    Without an evaluation split there is nothing to evaluate or to pick the best checkpoint by; custom
    classification data whose label column holds scores is a regression, scored by its own metric.
    """
    changes: dict[str, Any] = {}
    if not eval_splits:
        changes.update(eval_strategy="no", load_best_model_at_end=False)
    if "metric_for_best_model" not in config.explicit and task.best_metric != config.training.metric_for_best_model:
        changes["metric_for_best_model"] = task.best_metric
        if "greater_is_better" not in config.explicit:
            changes["greater_is_better"] = None  # TrainingArguments derives it from the metric
    return changes


def tokenized_splits(task: Task, config: RunConfig) -> tuple[DatasetDict, DatasetDict, Any]:
    """(raw, tokenized, tokenizer); the main process tokenizes first, the others read its cache."""
    tokenizer = task.load_tokenizer()
    raw = task.load_raw_datasets()
    with config.training.main_process_first(desc="tokenization"):
        tokenized = task.tokenize(raw, tokenizer)
    return raw, tokenized, tokenizer


def eval_dataset_arg(tokenized: DatasetDict, splits: list[str]) -> Dataset | dict[str, Dataset] | None:
    if not splits:
        return None
    if len(splits) == 1:
        return tokenized[splits[0]]
    return {split: tokenized[split] for split in splits}


def run_callbacks(config: RunConfig) -> list[TrainerCallback]:
    """Callbacks every training run gets."""
    from finetune.callbacks import default_callbacks

    return default_callbacks(config)


@dataclass
class PreparedRun:
    """A run ready for its first step: the task, its data, and the Trainer around the model."""

    task: Task
    trainer: Trainer
    raw: DatasetDict
    tokenized: DatasetDict
    eval_splits: list[str]
    resume: str | None


def prepare_training(config: RunConfig) -> PreparedRun:
    """Task, data, model and Trainer; the run folder gets the config with its final settings, once."""
    # Before the model loads: see finetune.allocator (LoRA freezes the embeddings, so it gives memory back).
    allocator.configure_for(trains_embeddings=not config.peft.use_peft)
    task = build_task(config)
    check_output_dir(config)
    resume = resume_checkpoint(config)
    set_seed(config.training.seed)

    raw, tokenized, tokenizer = tokenized_splits(task, config)
    if "train" not in tokenized:
        raise FinetuneError(f"no train split in {task.dataset_id()[0] or 'the data files'}: nothing to train on")
    eval_splits = task.eval_splits(raw)
    changes = settings_from_data(config, task, eval_splits) | decided_compile(config.training, len(tokenized["train"]))
    if changes:
        config.replace_training(**changes)
    model = trainable_model(task.load_model(tokenizer), config)
    trainer = task.build_trainer(
        model, tokenizer, tokenized["train"], eval_dataset_arg(tokenized, eval_splits), run_callbacks(config)
    )
    if trainer.is_world_process_zero():
        logger.warning("precision %s", config.precision)  # decided at parse time (finetune.precision)
        Path(config.training.output_dir).mkdir(parents=True, exist_ok=True)
        config.save(config.training.output_dir)
        run_info(config, task).write(config.training.output_dir)  # what the model card needs, as trained
    return PreparedRun(task, trainer, raw, tokenized, eval_splits, resume)


def train(config: RunConfig) -> dict[str, Any]:
    """Fine-tune, evaluate every eval split with the best model, save everything; returns metrics."""
    run = prepare_training(config)
    trainer = run.trainer
    try:
        result = trainer.train(resume_from_checkpoint=run.resume)
    finally:
        release_signal_handlers(trainer)
    stopped = preemption(trainer)
    if stopped is not None:  # SIGTERM: the checkpoint is all there is time for
        raise Preempted(stopped.checkpoint, stopped.step)
    if trainer.is_fsdp_enabled:
        # Sharded checkpoints suit resuming; the final model must be one loadable state dict.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    trainer.save_state()
    out = Path(config.training.output_dir)
    if adapters.is_peft_model(trainer.model) and trainer.is_world_process_zero():
        adapters.save_model_files(trainer.model, out)
    metrics: dict[str, Any] = {"train": clean(result.metrics), "eval": {}}
    metrics["parameters"] = adapters.parameter_counts(trainer.model)
    # Evaluated with the adapter as trained; merging changes the float rounding, not the model.
    metrics["eval"] = evaluate_splits(run.task, trainer, run.raw, run.tokenized, run.eval_splits)
    if trainer.is_world_process_zero():
        write_json(out / METRICS_FILE, metrics)
        if config.peft.merge_adapter:
            adapters.write_merged_model(trainer.model, out)
        report.write_report(out)
    return metrics


def trainable_model(model: Any, config: RunConfig) -> Any:
    """The model to train: with a fresh LoRA adapter under use_peft; a saved adapter run is merged first."""
    if config.peft.use_peft:
        return adapters.with_new_adapter(
            model, config.peft, config.model.model_name_or_path, config.training.gradient_checkpointing
        )
    if adapters.is_peft_model(model):
        return adapters.merged(model)
    return model


def evaluate_splits(
    task: Task, trainer: Trainer, raw: DatasetDict, tokenized: DatasetDict, splits: list[str]
) -> dict[str, dict[str, float]]:
    """Metrics per split, writing each split's predictions beside them."""
    results = {}
    for split in splits:
        output = task.predict(trainer, tokenized[split], split)
        results[split] = strip_prefix(output.metrics or {}, "eval_")
        if trainer.is_world_process_zero():
            write_predictions(task, raw[split], output, Path(trainer.args.output_dir), split)
    return results


def write_predictions(task: Task, raw: Dataset, output, out_dir: Path, split: str) -> Path:
    path = out_dir / task.predictions_file(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in task.prediction_records(raw, output):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def load_for_inference(config: RunConfig) -> tuple[Task, Trainer, DatasetDict, DatasetDict]:
    """Task, a Trainer around the loaded model (no training), and the raw and tokenized splits."""
    if any(getattr(config.training, k) != v for k, v in INFERENCE_SETTINGS.items()):
        # `finetune evaluate/predict` decide these at parse time; a config parsed for training gets new
        # arguments (the Trainer refuses an evaluation schedule without an evaluation set).
        config.replace_training(**INFERENCE_SETTINGS)
    task = build_task(config)
    raw, tokenized, tokenizer = tokenized_splits(task, config)
    model = task.load_model(tokenizer)
    trainer = task.build_trainer(model, tokenizer, None, None, [])
    return task, trainer, raw, tokenized


def require_splits(raw: DatasetDict, splits: list[str]) -> None:
    missing = [s for s in splits if s not in raw]
    if missing:
        raise FinetuneError(f"no split '{missing[0]}' in the data (splits: {', '.join(raw)})")


def evaluate(config: RunConfig, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Metrics of an existing model on labelled splits; written to output_dir/eval_results.json."""
    task, trainer, raw, tokenized = load_for_inference(config)
    splits = splits or task.eval_splits(raw)
    require_splits(raw, splits)
    results = evaluate_splits(task, trainer, raw, tokenized, splits)
    if trainer.is_world_process_zero():
        write_json(Path(trainer.args.output_dir) / "eval_results.json", results)
    return results


def predict(config: RunConfig, splits: list[str] | None = None) -> dict[str, Path]:
    """Prediction files (with label names) for the given splits, default the task's test splits.

    Every process gets the same answer (split -> file); the main process writes the files.
    """
    task, trainer, raw, tokenized = load_for_inference(config)
    splits = splits or task.predict_splits(raw)
    require_splits(raw, splits)
    paths = {}
    for split in splits:
        output = task.predict(trainer, tokenized[split], split)
        paths[split] = Path(trainer.args.output_dir) / task.predictions_file(split)
        if trainer.is_world_process_zero():
            write_predictions(task, raw[split], output, Path(trainer.args.output_dir), split)
    return paths


def strip_prefix(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    return clean({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in values.items()})


def clean(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe metrics (NaN becomes null)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def merge(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``finetune merge``: a copy of an adapter run whose model is the merged full model.

    The copy is a run directory like any other (settings, metrics, tokenizer, predictions), so evaluate,
    predict and push take it unchanged.
    """
    import transformers

    from finetune import modeling
    from finetune.config import ModelConfig

    run_dir = Path(run_dir)
    if not adapters.is_adapter_dir(run_dir):
        raise FinetuneError(f"{run_dir} holds no LoRA adapter ({adapters.ADAPTER_CONFIG}); nothing to merge")
    out = Path(out) if out else run_dir.with_name(run_dir.name + "-merged")
    if out.resolve() == run_dir.resolve():
        raise FinetuneError("finetune merge writes a new run directory; give an --output_dir other than the run")
    if out.is_dir() and any(out.iterdir()):
        raise FinetuneError(f"output_dir {out} is not empty; choose another --output_dir")
    config_file = run_dir / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") if config_file.is_file() else None
    if not architectures or not hasattr(transformers, architectures[0]):
        raise FinetuneError(f"{config_file} does not name the model class (architectures); cannot merge")
    model = modeling.load_model(getattr(transformers, architectures[0]), ModelConfig(model_name_or_path=str(run_dir)))
    adapters.copy_run_files(run_dir, out)
    adapters.merged(model).save_pretrained(out)
    return out
