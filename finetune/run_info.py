"""What a run records about itself for its model card: ``run_info.json``, written at train time.

``finetune push`` reads it back, so the card describes the run as it was trained, whatever machine pushes
it and whenever: the dataset id and configuration, the task's metrics, the Hub task type, the command
that reproduces the run from scratch, the precision it computed in, and the framework versions it ran with.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import allocator
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.config import RunConfig
    from finetune.task import Task

RUN_INFO_NAME = "run_info.json"
FRAMEWORKS = ("finetune", "transformers", "torch", "datasets", "accelerate", "huggingface_hub", "tokenizers")
#: settings left out of the reproduce command: a run starts without resuming, pushing is not part of
#: training, and tokens are never written anywhere
NOT_REPRODUCED = ("resume_from_checkpoint", "push_to_hub", "hub_", "_token", "logging_dir", "overwrite_output_dir")


@dataclass(frozen=True)
class RunInfo:
    """The facts about a run that its card shows and that its config file does not say by itself."""

    family: str
    task_name: str | None
    dataset: str | None  # Hub id; None for local files
    dataset_config: str | None
    hub_task_type: str
    #: the task's official metrics (the card shows these); empty: every quality metric the run reported
    metrics: tuple[str, ...]
    best_metric: str | None
    command: str
    frameworks: dict[str, str]
    #: the precision it computed in and why (finetune.precision); empty in runs recorded before it was kept
    precision: str = ""
    #: what served its allocations (finetune.allocator): tcmalloc and its library, or glibc's malloc
    malloc: str = ""

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / RUN_INFO_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> RunInfo:
        path = Path(directory) / RUN_INFO_NAME
        try:
            values = json.loads(path.read_text())
            return cls(**{**values, "metrics": tuple(values.get("metrics") or ())})
        except (OSError, ValueError, TypeError) as error:
            raise FinetuneError(f"cannot read {path}: {error}".splitlines()[0]) from None


def run_info(config: RunConfig, task: Task) -> RunInfo:
    """The run's facts, from its final settings and its task (dataset id, metrics, Hub task type)."""
    dataset, dataset_config = task.dataset_id()
    return RunInfo(
        family=task.family,
        task_name=config.data.task_name,
        dataset=dataset,
        dataset_config=dataset_config,
        hub_task_type=task.hub_task_type,
        metrics=tuple(task.metric_names()),
        best_metric=config.training.metric_for_best_model,
        command=reproduce_command(config),
        frameworks=framework_versions(),
        precision=config.precision,
        malloc=allocator.malloc_in_use(),
    )


def reproduce_command(config: RunConfig) -> str:
    """``finetune train RECIPE --flag value ...`` as the run was started, for a start from scratch.

    The settings as given (a caller's overrides as flags, then the command line), without resuming,
    pushing or tokens; derived settings (GPU defaults, output folder, metric) are derived again by the
    command itself, so it stays the same whichever machine shows it.
    """
    flags: list[str] = []
    tokens = list(config.typed)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        takes_next = token.startswith("--") and "=" not in token and i + 1 < len(tokens)
        takes_next = takes_next and not tokens[i + 1].startswith("--")
        pair = tokens[i: i + 2] if takes_next else [token]
        name = token[2:].split("=")[0] if token.startswith("--") else ""
        if not any(part in name for part in NOT_REPRODUCED):
            flags += pair
        i += len(pair)
    return shlex.join(["finetune", "train", *([str(config.recipe)] if config.recipe else []), *flags])


def as_flags(settings: dict[str, Any]) -> list[str]:
    """``{"learning_rate": 1e-4}`` as ``["--learning_rate", "0.0001"]``: settings given in code, as typed."""
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}", flag_value(value)]
    return flags


def flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def framework_versions() -> dict[str, str]:
    versions = {}
    for package in FRAMEWORKS:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
