"""Command line: ``finetune {recipes,train,evaluate,predict,push,glue,tune,runs}``.

Each command parses its settings into the typed config, then hands over to one pipeline function.
User errors (FinetuneError, also a NaN/inf training loss) print one line and exit with code 2; a run
stopped by SIGTERM after saving a checkpoint exits with PREEMPTED_EXIT_CODE (143).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import __version__, allocator
from finetune.distributed import prepare_launch_environment
from finetune.errors import PREEMPTED_EXIT_CODE, USAGE_EXIT_CODE, FinetuneError, Preempted

USAGE = """\
usage: finetune <command> [args]

commands:
  recipes                       list the shipped recipes
  train [RECIPE] [--flag v ...]  fine-tune (RECIPE: shipped name such as glue-mrpc, or a YAML path)
  evaluate MODEL [--split S]    metrics of a run directory or Hub id on a task split
  predict MODEL [--split S]     write predictions (with label names) for a split
  merge RUN_DIR [--output_dir D] merge a LoRA run's adapter into its base model (a full-model run copy)
  push RUN_DIR [--dry_run]      upload a finished run to the Hub with a model card
  glue --model_name_or_path X   fine-tune and evaluate on the GLUE tasks, write tables and a submission
  tune [RECIPE] [--n_trials N]  hyperparameter search (optuna), resumable; writes the best settings as a recipe
  runs [DIR]                    compare the finished runs under DIR (default runs): metric, time, samples/s

Every setting of `finetune train --help` can be given in a recipe or as --flag value. `--print_config` (train,
tune, glue) prints the fully resolved settings and exits without loading or writing anything.
`finetune --version` prints the versions and the device finetune would compute on.
"""
#: train/tune/glue: print the resolved configuration and exit
PRINT_CONFIG = "--print_config"


#: the commands that train or run a model: their process restarts under tcmalloc where it is installed
#: (finetune.allocator; FINETUNE_MALLOC=system keeps the C library's malloc)
COMPUTING_COMMANDS = ("train", "evaluate", "predict", "glue", "tune")


def main(argv: list[str] | None = None) -> int:
    started_as_process = argv is None  # the console script or `python -m finetune`, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else USAGE_EXIT_CODE
    if argv[0] == "--version":
        print(version_report())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command '{command}' (commands: {', '.join(COMMANDS)})")
    quiet_third_party_logs()
    try:
        if started_as_process and command in COMPUTING_COMMANDS:
            allocator.restart_with_tcmalloc()
        prepare_launch_environment()
        return COMMANDS[command](rest) or 0
    except FinetuneError as error:
        return fail(str(error))
    except Preempted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"finetune: {stopped}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130


def version_report() -> str:
    """finetune's version, the versions of the libraries it runs on, and what it would compute on here."""
    from importlib import metadata

    import torch

    from finetune import precision

    lines = [f"finetune {__version__}"]
    for package in ("transformers", "torch", "accelerate", "datasets", "peft"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    unit = precision.cpu_bf16_unit(precision.cpu_flags())
    cpu = f"cpu: {os.cpu_count()} cores, {unit.name if unit else 'no bf16 units'}"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    lines += [cpu, f"gpu: {', '.join(gpus) if gpus else 'none'}", f"malloc: {malloc_report()}"]
    return "\n".join(lines)


def malloc_report() -> str:
    """Which malloc the training commands would run with here, and how to choose the other."""
    choice = os.environ.get(allocator.MALLOC_ENV, "tcmalloc")
    library = allocator.tcmalloc_library()
    preloaded = allocator.preloaded_malloc()
    if preloaded:
        return f"{preloaded}, preloaded"
    if choice == "system":
        return f"the C library's ({allocator.MALLOC_ENV}=system)"
    if library is None or allocator.glibc() is None:
        return "the C library's (no tcmalloc installed: apt-get install libtcmalloc-minimal4 for a faster one)"
    commands = ", ".join(COMPUTING_COMMANDS)
    return f"tcmalloc ({library}) for {commands}; {allocator.MALLOC_ENV}=system for the C library's"


def take_flag(argv: list[str], flag: str) -> tuple[bool, list[str]]:
    """(whether ``flag`` was given, argv without it)."""
    return flag in argv, [arg for arg in argv if arg != flag]


def fail(message: str) -> int:
    print(f"finetune: error: {message}", file=sys.stderr)
    return USAGE_EXIT_CODE


def quiet_third_party_logs() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("datasets").setLevel(logging.WARNING)
    # peft imports bitsandbytes where installed, for every LoRA run; its CPU backend then warns that the optional
    # `kernels` package (which fetches a faster 4-bit kernel from the Hub) is missing, and uses its own kernel.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------


def split_positional(argv: list[str]) -> tuple[str | None, list[str]]:
    """(first argument if it is not a flag, the rest)."""
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def show_help(prog: str, intro: str) -> int:
    from finetune.config import argument_parser

    parser = argument_parser(prog)
    parser.usage = f"{prog} {intro}"
    parser.print_help()
    return 0


def parsed_config(recipe: str | None, argv: list[str], overrides: dict[str, Any] | None = None):
    from finetune import mirror
    from finetune.config import parse_run_config

    config = parse_run_config(recipe, argv, overrides)
    mirror.use_mirror(config.hub.hub_mirror)
    return config


def cmd_recipes(argv: list[str]) -> int:
    from finetune.config import print_recipes

    print_recipes()
    return 0


def cmd_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        return show_help("finetune train", "[RECIPE] [--flag value ...]")
    show, argv = take_flag(argv, PRINT_CONFIG)
    recipe, rest = split_positional(argv)
    config = parsed_config(recipe, rest)
    if show:  # the resolved settings, derived ones included; nothing loaded, nothing written
        print(config.to_yaml(), end="")
        return 0
    from finetune import pipeline
    from finetune.hub import push

    push.prepare_push(config)  # a missing token fails now, not after hours of training
    metrics = pipeline.train(config)
    if config.training.process_index == 0:
        print_metrics_table(metrics["eval"])
        print(f"run saved to {config.training.output_dir}")
        maybe_push(config)
    return 0


def maybe_push(config) -> None:
    if not config.training.push_to_hub:
        return
    from finetune.hub import push

    push.push_run(config.training.output_dir, config=config)


def split_option(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """(--split values, remaining argv)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--split", default=None)
    known, rest = parser.parse_known_args(argv)
    return (known.split.split(",") if known.split else None), rest


def inference_config(argv: list[str], prog: str):
    """Config for evaluate/predict: the run's own saved data settings, the model, then overrides."""
    if any(a in ("-h", "--help") for a in argv):
        show_help(prog, "MODEL [--split SPLIT] [--flag value ...]")
        raise SystemExit(0)
    model, rest = split_positional(argv)
    if model is None:
        raise FinetuneError(f"{prog} needs MODEL: a run directory or a Hub id")
    splits, rest = split_option(rest)
    require_model_source(model, prog)
    from finetune.config import INFERENCE_SETTINGS, DataConfig, load_saved_config

    saved = load_saved_config(model) if Path(model).is_dir() else {}
    # The run's own data settings (task, columns, lengths) make `evaluate RUN_DIR` need no other flags.
    overrides: dict[str, Any] = {
        k: v for k, v in saved.get("data", {}).items() if k in DataConfig.__dataclass_fields__ and v is not None
    }
    keep = ("tokenizer_name", "attn_implementation", "trust_remote_code")
    overrides.update({k: v for k, v in saved.get("model", {}).items() if k in keep and v is not None})
    # Generation tasks decode as the run did (max_new_tokens, num_beams, ...) unless told otherwise.
    overrides.update({k: v for k, v in saved.get("generation", {}).items() if v is not None})
    overrides["model_name_or_path"] = model
    # Results go beside a run's model (or into runs/eval-<name> for a Hub id), unless --output_dir says otherwise.
    source = Path(model)
    overrides["output_dir"] = str(source if source.is_dir() else Path("runs") / f"eval-{source.name}")
    overrides.update(INFERENCE_SETTINGS)
    return parsed_config(None, rest, overrides), splits


def require_model_source(model: str, prog: str) -> None:
    """A local MODEL must be a folder holding a model: a finished run, one of its checkpoints, or a saved model."""
    from finetune.config import RESOLVED_CONFIG_NAME
    from finetune.validation import looks_local

    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        if (path / RESOLVED_CONFIG_NAME).is_file():
            raise FinetuneError(
                f"{prog}: {model} is a finetune run without a saved model (no config.json): its training did not "
                "finish; resume it (--resume_from_checkpoint last) or give one of its checkpoint-N folders"
            )
        raise FinetuneError(
            f"{prog}: {model} is not a finetune run (no {RESOLVED_CONFIG_NAME}) nor a model folder (no config.json)"
        )
    if path.exists():
        raise FinetuneError(f"{prog}: {model} is a file; MODEL is a run folder or a Hub model id")
    if looks_local(model):
        raise FinetuneError(f"{prog}: {model}: no such folder (MODEL is a run folder or a Hub model id)")
    from finetune import mirror

    root = mirror.mirror_root()
    if root is not None and (root / "datasets" / model).is_dir() and not (root / "models" / model).is_dir():
        raise FinetuneError(f"{prog}: {model} is a dataset (in the mirror {root}), not a model")


def cmd_evaluate(argv: list[str]) -> int:
    config, splits = inference_config(argv, "finetune evaluate")
    from finetune import pipeline

    results = pipeline.evaluate(config, splits)
    if config.training.process_index == 0:
        print_metrics_table(results)
        print(f"metrics written to {Path(config.training.output_dir) / 'eval_results.json'}")
    return 0


def cmd_predict(argv: list[str]) -> int:
    config, splits = inference_config(argv, "finetune predict")
    from finetune import pipeline

    paths = pipeline.predict(config, splits)
    if config.training.process_index == 0:
        for split, path in paths.items():
            print(f"{split}: predictions written to {path}")
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """argparse whose errors are one `finetune: error:` line and exit code 2 (no usage block)."""

    def error(self, message: str):
        raise FinetuneError(f"{self.prog}: {message}")


def cmd_merge(argv: list[str]) -> int:
    parser = OneLineErrors(
        prog="finetune merge", description="Merge a LoRA run's adapter into its base model and save the full model."
    )
    parser.add_argument("run_dir", help="run directory holding adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--output_dir", default=None, help="where the merged run goes (default: RUN_DIR-merged)")
    parser.add_argument("--hub_mirror", default=None, help="offline mirror for the base model (see train --help)")
    options = parser.parse_args(argv)
    from finetune import mirror, pipeline

    mirror.use_mirror(options.hub_mirror)
    out = pipeline.merge(options.run_dir, options.output_dir)
    print(f"merged model written to {out}")
    return 0


def cmd_push(argv: list[str]) -> int:
    from finetune.glue.report import GLUE_FOLDER
    from finetune.hub import push

    # The GLUE folder brings its own card and files; hub/ knows nothing of glue/ (no import circle).
    return push.main(argv, folder_kinds=[GLUE_FOLDER])


def cmd_tune(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        return show_help("finetune tune", "[RECIPE] [--n_trials N] [--tune_seeds K] [--flag value ...]")
    show, argv = take_flag(argv, PRINT_CONFIG)
    recipe, rest = split_positional(argv)
    config = parsed_config(recipe, rest)
    if show:
        print(config.to_yaml(), end="")
        return 0
    from finetune import tune

    result = tune.tune(config)
    print(f"{result.finished} trials finished; best validation score {result.best_value:.4f} with "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items()))
    for path in result.files:
        print(f"wrote {path}")
    print(f"next: finetune train {result.output_dir / tune.BEST_RECIPE}")
    return 0


def cmd_glue(argv: list[str]) -> int:
    from finetune.glue import runner

    return runner.main(argv)


def cmd_runs(argv: list[str]) -> int:
    from finetune import runs

    return runs.main(argv)


def print_metrics_table(results: dict[str, dict[str, Any]]) -> None:
    """split | metric | value, one line per metric."""
    rows = [(split, name, value) for split, values in results.items() for name, value in values.items()
            if not name.endswith(("runtime", "per_second", "_loss")) and name != "epoch"]
    if not rows:
        return
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for split, name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{split:<{width[0]}}  {name:<{width[1]}}  {shown}")


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "recipes": cmd_recipes,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "merge": cmd_merge,
    "push": cmd_push,
    "glue": cmd_glue,
    "tune": cmd_tune,
    "runs": cmd_runs,
}
