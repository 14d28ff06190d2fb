"""``finetune glue``: fine-tune and evaluate one checkpoint on the GLUE tasks, then report and submit.

For each task of ``tasks/glue.py``'s table (in table order) and each seed, the task's shipped recipe
(``glue-<task>``) is trained into ``<out>/<task>/seed-<seed>`` with the user's extra flags on top. The
best seed's model then predicts the test split(s), which become the GLUE server's submission files.
Tasks predicted with another task's model (AX with MNLI's) are not trained. Everything task-specific
is read from the table row, so the loop has no per-task branches.

Outputs in ``<out>``: ``glue_results.json`` (every number, per seed), ``glue_results.md`` (the table:
per task metrics, mean and std over seeds, and the average), ``glue_scores.png`` (bar chart), and
``submission/*.tsv`` zipped as ``glue_submission.zip``.

Resumable: a seed whose ``metrics.json`` exists is not trained again, and one stopped after a checkpoint
(SIGTERM, crash) resumes from it. A task that fails is reported
with its reason and the others go on; a task the data source does not have is reported as skipped.

Under ``accelerate launch`` every process runs this loop (training and prediction are collective), takes
the same decisions from the same values, and waits for the others before it looks at files another may be
writing; only the main process writes the reports and the submission, and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from finetune import mirror
from finetune.config import INFERENCE_SETTINGS
from finetune.errors import FinetuneError, Preempted
from finetune.glue import CHART, RESULTS_JSON, RESULTS_MD, SUBMISSION_ZIP, TaskResult
from finetune.glue.report import write_results
from finetune.tasks.glue import GLUE_DATASET, GLUE_TASKS, GluePreset

FIRST_SEED = 42  # the recipes' seed; --seeds N runs 42, 43, ...
#: set by the runner itself for every run, so not accepted as pass-through flags
OWN_FLAGS = ("--model_name_or_path", "--output_dir", "--seed", "--task_name", "--push_to_hub")
PRINT_CONFIG = "--print_config"  # as in finetune train: print what each run would use, then stop


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    show = PRINT_CONFIG in argv
    options, passthrough = parse_options([arg for arg in argv if arg != PRINT_CONFIG])
    seeds = seed_list(options.seeds)
    tasks = task_list(options.tasks)
    out = Path(options.output_dir or Path("runs") / f"glue-{Path(options.model_name_or_path).name}")
    if show:
        print_configs(options.model_name_or_path, tasks, seeds, out, passthrough)
        return 0
    results = run_benchmark(options.model_name_or_path, tasks, seeds, out, passthrough)
    say(Path(out / RESULTS_MD).read_text())
    say(f"results: {out / RESULTS_JSON}, chart: {out / CHART}, submission: {out / SUBMISSION_ZIP}")
    failed = [name for name, r in results["tasks"].items() if r["status"] == "failed"]
    if failed:
        say(f"finetune: {len(failed)} task(s) failed: {', '.join(failed)} (see the table)", file=sys.stderr)
    return 1 if failed else 0


def print_configs(model: str, tasks: list[str], seeds: list[int], out: Path, passthrough: list[str]) -> None:
    """The resolved config of each run the command would train (one YAML document per task, first seed)."""
    for name in tasks:
        if GLUE_TASKS[name].trained_as:  # predicted with another task's model: nothing of its own is trained
            continue
        run_dir = out / name / f"seed-{seeds[0]}"
        config = parsed(f"glue-{name}", run_argv(model, run_dir, passthrough, seeds[0]))
        print(f"--- # glue {name}, seed {seeds[0]} of {len(seeds)}\n{config.to_yaml()}", end="")


def say(text: str, file=None) -> None:
    """Print once, from the main process."""
    if PartialState().is_main_process:
        print(text, file=file or sys.stdout, flush=True)


def record(
    out: Path, model: str, seeds: list[int], passthrough: list[str], results: dict[str, TaskResult], final: bool = False
) -> dict:
    """The main process writes the reports (and the submission, deleting stale files); the others receive the
    document it recorded, so every process goes on from the same record.

    Received, not read back from the file: right after, the main process may already be rewriting it.
    """
    main = PartialState().is_main_process
    document = [write_results(out, model, seeds, passthrough, results, final) if main else None]
    return broadcast_object_list(document)[0]


def parse_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(runner options, flags passed through to every training run)."""
    parser = argparse.ArgumentParser(
        prog="finetune glue",
        description="Fine-tune and evaluate a checkpoint on GLUE with each task's recipe. Any `finetune train` "
        "flag (e.g. --max_train_samples 500 --num_train_epochs 1) is passed on to every run.",
        allow_abbrev=False,
    )
    parser.add_argument("--model_name_or_path", required=True, help="Hub id or local path of the checkpoint")
    parser.add_argument(
        "--tasks", default=None, help=f"comma-separated GLUE tasks (default: all of {', '.join(GLUE_TASKS)})"
    )
    parser.add_argument(
        "--seeds", default="1", help=f"number of seeds ({FIRST_SEED}, {FIRST_SEED + 1}, ...) or a comma list"
    )
    parser.add_argument("--output_dir", default=None, help="default: runs/glue-<model name>")
    try:
        options, passthrough = parser.parse_known_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0:
            raise
        raise FinetuneError("finetune glue needs --model_name_or_path (see finetune glue --help)") from None
    own = [flag for flag in passthrough if flag.split("=")[0] in OWN_FLAGS]
    if own:
        raise FinetuneError(f"{own[0].split('=')[0]} is set by finetune glue for each run; leave it out")
    return options, passthrough


def seed_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise FinetuneError(f"--seeds takes a count or a comma list of integers, not '{text}'") from None
    if len(values) == 1:
        if values[0] < 1:
            raise FinetuneError("--seeds must be at least 1")
        return [FIRST_SEED + i for i in range(values[0])]
    return values


def task_list(text: str | None) -> list[str]:
    """Requested tasks in table order (trainers before the tasks predicted with their models)."""
    if not text:
        return list(GLUE_TASKS)
    wanted = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in GLUE_TASKS]
    if unknown:
        raise FinetuneError(f"unknown GLUE task '{unknown[0]}' (known: {', '.join(GLUE_TASKS)})")
    return [t for t in GLUE_TASKS if t in wanted]


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def run_benchmark(model: str, tasks: list[str], seeds: list[int], out: Path, passthrough: list[str]) -> dict:
    """Train/evaluate/predict every task, then write the results, table, chart and submission."""
    out.mkdir(parents=True, exist_ok=True)
    check_passthrough(model, tasks, passthrough)
    results: dict[str, TaskResult] = {}
    for name in tasks:
        preset = GLUE_TASKS[name]
        result = results[name] = TaskResult(config=name)
        say(f"== GLUE {name} ==")
        try:
            missing = missing_from_source(name, model, passthrough)
            if missing:
                result.status, result.reason = "skipped", missing
            elif preset.trained_as:
                predict_with_trainer_task(name, preset, results, model, out, passthrough)
            else:
                train_seeds(name, preset, result, model, seeds, out, passthrough)
                predict_into(name, preset, out / str(result.best_run), out / str(result.best_run), out, passthrough,
                             result)
                result.status = "done"
        except Preempted:  # SIGTERM: the checkpoint is saved; the same command resumes from it
            result.status, result.reason = "failed", "stopped by SIGTERM; run the same command to resume"
            record(out, model, seeds, passthrough, results)
            raise
        except FinetuneError as error:
            result.status, result.reason = "failed", str(error)
        except Exception as error:  # one broken task must not stop the benchmark; its traceback is kept
            result.status, result.reason = "failed", f"{type(error).__name__}: {mirror.first_line(error)}"
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / error_log_name()).write_text(traceback.format_exc())
        if result.status != "done":
            say(f"GLUE {name}: {result.status}: {result.reason}")
        record(out, model, seeds, passthrough, results)
    return record(out, model, seeds, passthrough, results, final=True)


def error_log_name() -> str:
    """error.log; other processes keep their own traceback beside it (error.rank1.log)."""
    state = PartialState()
    return "error.log" if state.is_main_process else f"error.rank{state.process_index}.log"


def run_argv(model: str, run_dir: Path, passthrough: list[str], seed: int | None = None) -> list[str]:
    argv = [*passthrough, "--model_name_or_path", model, "--output_dir", str(run_dir)]
    return argv + (["--seed", str(seed)] if seed is not None else [])


def parsed(recipe: str, argv: list[str], overrides: dict[str, Any] | None = None):
    from finetune.config import parse_run_config

    config = parse_run_config(recipe, argv, overrides)
    mirror.use_mirror(config.hub.hub_mirror)
    return config


def check_passthrough(model: str, tasks: list[str], passthrough: list[str]) -> None:
    """Bad pass-through flags fail now, before the first task trains for an hour."""
    config = parsed(f"glue-{tasks[0]}", run_argv(model, Path("unused"), passthrough))
    if config.training.push_to_hub:
        raise FinetuneError("finetune glue does not push each run; push the results with `finetune push OUT`")


def data_source(passthrough: list[str]) -> str:
    config = parsed("glue-cola", passthrough)
    return config.data.dataset_name or GLUE_DATASET


def missing_from_source(name: str, model: str, passthrough: list[str]) -> str | None:
    """Why the task cannot run because its data is absent (None when present or when it cannot be told)."""
    import datasets

    source = data_source(passthrough)
    where = mirror.resolve(source, "datasets")
    try:
        available = datasets.get_dataset_config_names(where)
    except Exception:  # unreachable source: training will say what is wrong
        return None
    if name not in available:
        place = f"the mirror copy {where}" if where != source else f"'{source}'"
        return f"not in the data source: {place} has no '{name}' configuration (it has {', '.join(available)})"
    return None


def train_seeds(
    name: str, preset: GluePreset, result: TaskResult, model: str, seeds: list[int], out: Path, passthrough: list[str]
) -> None:
    from finetune import pipeline
    from finetune.callbacks import last_complete_checkpoint

    per_seed: list[dict[str, dict[str, float]]] = []
    for seed in seeds:
        run_dir = out / name / f"seed-{seed}"
        metrics_file = run_dir / pipeline.METRICS_FILE
        PartialState().wait_for_everyone()  # every process sees the folder as it is, before anyone writes to it
        if metrics_file.is_file():
            say(f"GLUE {name} seed {seed}: finished earlier, reusing {run_dir}")
            evaluated = json.loads(metrics_file.read_text())["eval"]
        else:
            argv = run_argv(model, run_dir, passthrough, seed)
            if run_dir.is_dir() and last_complete_checkpoint(str(run_dir)):  # stopped after a save: go on
                argv += ["--resume_from_checkpoint", "last"]
            elif run_dir.is_dir() and any(run_dir.iterdir()):  # stopped before any checkpoint: start again
                argv += ["--overwrite_output_dir", "true"]
            # The returned metrics, not metrics.json: the main process may still be writing that.
            evaluated = pipeline.train(parsed(f"glue-{name}", argv))["eval"]
        per_seed.append(declared_metrics(evaluated, preset))
        result.runs[str(seed)] = (run_dir.relative_to(out)).as_posix()
    result.metrics = aggregate_metrics(per_seed)
    scores = [task_score(m) for m in per_seed]
    result.score = summary(scores)
    result.best_run = result.runs[str(seeds[int(np.argmax(scores))])]


def declared_metrics(evaluated: dict[str, dict[str, Any]], preset: GluePreset) -> dict[str, dict[str, float]]:
    """split -> the task's official metrics (as GLUE reports them)."""
    return {
        split: {m: float(evaluated[split][m]) for m in preset.metrics if evaluated[split].get(m) is not None}
        for split in preset.eval_splits
        if split in evaluated
    }


def task_score(metrics: dict[str, dict[str, float]]) -> float:
    """GLUE's task score: the unweighted mean of the task's metrics (over its evaluation splits)."""
    values = [v for split in metrics.values() for v in split.values()]
    return float(np.mean(values)) if values else float("nan")


def summary(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(np.mean(array)), "std": std, "values": [float(v) for v in array]}


def aggregate_metrics(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    splits = {split: list(values) for m in per_seed for split, values in m.items()}
    return {
        split: {metric: summary([m[split][metric] for m in per_seed if metric in m.get(split, {})])
                for metric in metrics}
        for split, metrics in splits.items()
    }


def predict_into(
    name: str, preset: GluePreset, model_dir: Path, target: Path, out: Path, passthrough: list[str], result: TaskResult
) -> None:
    """Test-split predictions of ``model_dir`` into ``target``: the input of the submission files."""
    from finetune import pipeline

    done = [target / f"predictions_{split}.jsonl" for split in preset.predict_splits]
    if not all(path.is_file() for path in done):
        overrides = {"model_name_or_path": str(model_dir), "output_dir": str(target), **INFERENCE_SETTINGS}
        config = parsed(f"glue-{name}", passthrough, overrides)
        written = pipeline.predict(config)
        if not written:
            result.note = "no test split in the data source: no submission file"
    result.best_run = result.best_run or target.relative_to(out).as_posix()


def predict_with_trainer_task(
    name: str, preset: GluePreset, results: dict[str, TaskResult], model: str, out: Path, passthrough: list[str]
) -> None:
    """A task predicted with another task's fine-tuned model (AX with MNLI's): no training of its own."""
    result = results[name]
    trainer = results.get(str(preset.trained_as))
    if trainer is None or trainer.status != "done":
        why = "was not run" if trainer is None else f"is {trainer.status}"
        result.status = "skipped"
        result.reason = f"predicted with the {preset.trained_as} model, and {preset.trained_as} {why}"
        return
    model_dir = out / str(trainer.best_run)
    predict_into(name, preset, model_dir, out / name, out, passthrough, result)
    result.note = f"predicted with the {preset.trained_as} model ({trainer.best_run})"
    result.status = "done"
