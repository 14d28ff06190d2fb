"""Publishing to the Hugging Face Hub: a finished run (or a GLUE benchmark folder) with a model card.

``finetune push RUN_DIR`` and ``finetune train --push_to_hub`` both end in :func:`push_run`, which

1. builds the model card (base model, dataset, licence carried from the base model, ``model-index``
   results the Hub renders, hyperparameters, framework versions, the command that reproduces the run,
   and a training-curve image) and writes it, with the image, into the run directory;
2. creates the repo (and branch) and uploads the run's files in one commit, with ``huggingface_hub``.

With ``hub_strategy=end`` (the default) the Trainer does not push at all: the model is uploaded once,
after training, together with its card. With ``every_save``, ``checkpoint`` or ``all_checkpoints`` the
Trainer's own machinery pushes during training, and the final upload with the card follows the same way.

The token comes from ``HF_TOKEN`` or the ``hf auth login`` cache through ``huggingface_hub.get_token``;
it is handed to ``HfApi`` only, never printed, saved or put in an error message. Hub failures become
one-line :class:`FinetuneError` messages; transient ones (5xx, 429, connection errors) are retried.
Nothing in the run directory is changed by a failed push except the card and image written before it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO, TypeVar

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard import metadata_load

from finetune import __version__, mirror
from finetune.config import RESOLVED_CONFIG_NAME, DataConfig, load_saved_config
from finetune.errors import FinetuneError

T = TypeVar("T")

CARD_NAME = "README.md"
CURVES_NAME = "training_curves.png"
GLUE_RESULTS_NAME = "glue_results.json"
#: never uploaded: checkpoints (optimizer state), the pickled TrainingArguments, hidden and lock files
IGNORED = ("checkpoint-*", "training_args.bin", ".*", "*.lock", "error.log")
#: hub_strategy values with which the Trainer pushes during training (``end`` leaves the push to us)
TRAINER_PUSH_STRATEGIES = ("every_save", "checkpoint", "all_checkpoints")
RETRY_ATTEMPTS = 4
TRANSIENT_STATUS = (429, 500, 502, 503, 504)
FRAMEWORKS = ("finetune", "transformers", "torch", "datasets", "accelerate", "huggingface_hub", "tokenizers")
HYPERPARAMETERS = {
    "training": (
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "seed", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay",
        "bf16", "fp16", "metric_for_best_model",
    ),
    "data": ("max_seq_length", "max_train_samples", "max_eval_samples"),
}
#: settings left out of the reproduce command: pushing is not part of training, tokens are never shown
NOT_REPRODUCED = ("push_to_hub", "hub_", "_token", "logging_dir", "overwrite_output_dir")


@dataclass
class PushSettings:
    """Where a push goes."""

    repo_id: str
    revision: str | None = None
    private: bool | None = None
    commit_message: str = "Upload fine-tuned model with finetune"


@dataclass
class UploadPlan:
    """What a push uploads: (local file, path in repo) pairs and the card (already among the files)."""

    settings: PushSettings
    files: list[tuple[Path, str]] = field(default_factory=list)
    card: ModelCard | None = None


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune push",
        description="Upload a finished run directory (or a `finetune glue` folder) to the Hub with a model card.",
    )
    parser.add_argument("run_dir", help="run directory written by `finetune train` (or `finetune glue`)")
    parser.add_argument("--hub_model_id", help="repo id (user/name); default: the run's hub_model_id, else its name")
    parser.add_argument("--hub_revision", help="branch to push to (created if missing); default: main")
    parser.add_argument("--hub_private_repo", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--dry_run", action="store_true", help="print the repo, files and card; upload nothing")
    args = parser.parse_args(argv)
    push_run(
        args.run_dir,
        dry_run=args.dry_run,
        repo_id=args.hub_model_id,
        revision=args.hub_revision,
        private=args.hub_private_repo,
        commit_message=args.commit_message,
    )
    return 0


@contextmanager
def trainer_push_handled(config) -> Iterator[None]:
    """Around ``pipeline.train``: check the token before training, and keep the Trainer from pushing a
    model without our card (it would push from ``save_model``) unless checkpoints are to be pushed.

    ``push_to_hub`` is restored afterwards and the run's saved config rewritten, so that it records what
    the user asked for.
    """
    args = config.training
    if not args.push_to_hub:
        yield
        return
    if not config.hub.dry_run:
        hub_token()  # fail now, not after hours of training
    strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
    trainer_pushes = not config.hub.dry_run and strategy in TRAINER_PUSH_STRATEGIES
    if trainer_pushes and args.process_index == 0:
        prepare_repo(args)
    args.push_to_hub = trainer_pushes
    try:
        yield
    finally:
        args.push_to_hub = True
    saved = Path(args.output_dir) / RESOLVED_CONFIG_NAME
    if not trainer_pushes and args.process_index == 0 and saved.is_file():
        config.save(args.output_dir)


def prepare_repo(args, sleep: Callable[[float], None] = time.sleep) -> None:
    """The repo and branch the Trainer pushes checkpoints into (it expects both to exist)."""
    token = hub_token()
    api = hub_api(token)
    wanted = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        repo_url = hub_call(
            lambda: api.create_repo(wanted, private=args.hub_private_repo, exist_ok=True), "creating", wanted, sleep
        )
        if args.hub_revision and args.hub_revision != "main":
            hub_call(
                lambda: api.create_branch(repo_url.repo_id, branch=args.hub_revision, exist_ok=True),
                "creating branch of", repo_url.repo_id, sleep,
            )
    except FinetuneError as error:
        raise FinetuneError(redacted(str(error), token)) from None


def push_run(
    run_dir: str | Path,
    config=None,
    *,
    dry_run: bool | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    out: TextIO | None = None,
) -> str | None:
    """Push ``run_dir`` (a run or a GLUE folder) with its card; returns the commit URL (None for a dry run).

    Settings come from the arguments, else from ``config`` (a RunConfig), else from the run's saved config.
    """
    out = out or sys.stdout
    run_dir = Path(run_dir)
    saved = config.to_dict() if config is not None else load_saved_config(run_dir)
    training = saved.get("training", {})
    if dry_run is None:
        dry_run = bool(saved.get("hub", {}).get("dry_run"))
    settings = PushSettings(
        repo_id=repo_id or training.get("hub_model_id") or default_repo_name(run_dir),
        revision=revision or training.get("hub_revision"),
        private=private if private is not None else training.get("hub_private_repo"),
    )
    if commit_message:
        settings.commit_message = commit_message
    if dry_run:
        plan = upload_plan(run_dir, saved, settings, api=None)
        print_plan(plan, out)
        return None

    token = hub_token()
    api = hub_api(token)
    try:
        return upload(api, run_dir, saved, settings, sleep, out)
    except FinetuneError as error:
        raise FinetuneError(redacted(str(error), token)) from None


def upload(api: HfApi, run_dir: Path, saved: dict, settings: PushSettings, sleep, out: TextIO) -> str:
    """Create the repo (and branch), then one commit with every planned file."""
    wanted = settings.repo_id
    repo_url = hub_call(
        lambda: api.create_repo(wanted, private=settings.private, exist_ok=True), "creating", wanted, sleep
    )
    settings.repo_id = repo_url.repo_id
    if settings.revision and settings.revision != "main":
        hub_call(
            lambda: api.create_branch(settings.repo_id, branch=settings.revision, exist_ok=True),
            "creating branch of", settings.repo_id, sleep,
        )
    plan = upload_plan(run_dir, saved, settings, api=api)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for path, name in plan.files]
    info = hub_call(
        lambda: api.create_commit(
            settings.repo_id, operations, commit_message=settings.commit_message, revision=settings.revision
        ),
        "uploading to", settings.repo_id, sleep,
    )
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{settings.repo_id}"
    print(f"pushed {len(plan.files)} files to https://huggingface.co/{settings.repo_id} ({url})", file=out)
    return url


# ---------------------------------------------------------------------------------------------------------
# Token, client, errors
# ---------------------------------------------------------------------------------------------------------


def hub_token() -> str:
    """The user's token (HF_TOKEN or the `hf auth login` cache); a one-line error when there is none."""
    try:
        token = get_token()
    except Exception as error:  # an OIDC exchange that was asked for and failed
        raise FinetuneError(f"cannot get a Hugging Face token: {first_line(error)}") from None
    if not token:
        raise FinetuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry_run)")
    return token


def hub_api(token: str) -> HfApi:
    """The client every push goes through (tests replace this function with a stub)."""
    return HfApi(token=token, library_name="finetune", library_version=__version__)


def hub_call(action: Callable[[], T], doing: str, repo_id: str, sleep: Callable[[float], None]) -> T:
    """``action()``, retrying transient failures with exponential backoff; others become one-line errors."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return action()
        except Exception as error:
            if not is_hub_failure(error):
                raise
            if not is_transient(error) or attempt == RETRY_ATTEMPTS - 1:
                raise FinetuneError(push_error(error, doing, repo_id, attempt + 1)) from None
            sleep(2.0**attempt)
    raise AssertionError("unreachable")


def status_of(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_hub_failure(error: BaseException) -> bool:
    """Errors that come from talking to the Hub (as opposed to bugs), across the HTTP stacks in use."""
    import httpx2
    import requests

    return isinstance(
        error, (HfHubHTTPError, httpx2.HTTPError, requests.RequestException, OSError, HFValidationError)
    )


def is_transient(error: BaseException) -> bool:
    import httpx2
    import requests

    if isinstance(error, (OfflineModeIsEnabled, LocalTokenNotFoundError)):
        return False
    if isinstance(error, HfHubHTTPError):
        return status_of(error) in TRANSIENT_STATUS
    return isinstance(
        error,
        (httpx2.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError),
    )


def push_error(error: BaseException, doing: str, repo_id: str, attempts: int) -> str:
    """One line saying what went wrong and what to do about it."""
    status = status_of(error)
    where = f"{doing} {repo_id}"
    if isinstance(error, OfflineModeIsEnabled):
        return f"cannot reach the Hub while {where}: HF_HUB_OFFLINE is set (unset it to push, or use --dry_run)"
    if isinstance(error, HFValidationError):
        return f"invalid repo id '{repo_id}': {first_line(error)}"
    if isinstance(error, LocalTokenNotFoundError) or status == 401:
        return (
            f"the Hub rejected the token (401) while {where}: run `hf auth login` or set HF_TOKEN to a token "
            "with write access"
        )
    if status == 403:
        return (
            f"no write access to {repo_id} (403): the repo or namespace belongs to another user or organisation, "
            "or the token is read-only"
        )
    if status == 409:
        return f"{repo_id} conflicts with an existing repo (409): {server_message(error)}"
    if isinstance(error, RevisionNotFoundError):
        return f"branch not found while {where}: {server_message(error)}"
    if isinstance(error, RepositoryNotFoundError):
        return f"repo {repo_id} not found, or not visible with this token, while {doing} it"
    if is_transient(error):
        return (
            f"the Hub did not answer while {where} after {attempts} attempts "
            f"({type(error).__name__}: {first_line(error)}); the run directory is unchanged, retry with "
            "`finetune push RUN_DIR`"
        )
    return f"push failed while {where}: {type(error).__name__}: {first_line(error)}"


def server_message(error: BaseException) -> str:
    return getattr(error, "server_message", None) or first_line(error)


def first_line(error: BaseException) -> str:
    return mirror.first_line(error)


def redacted(text: str, token: str | None) -> str:
    """Belt and braces: no message leaves this module with the token in it."""
    return text.replace(token, "***") if token else text


# ---------------------------------------------------------------------------------------------------------
# What is uploaded
# ---------------------------------------------------------------------------------------------------------


def default_repo_name(run_dir: Path) -> str:
    return Path(run_dir).resolve().name


def upload_plan(run_dir: Path, saved: dict, settings: PushSettings, api: HfApi | None) -> UploadPlan:
    """Write the card (and curves) into ``run_dir`` and list the files to upload."""
    if (run_dir / GLUE_RESULTS_NAME).is_file():
        from finetune import glue_benchmark

        card = glue_benchmark.model_card(run_dir, settings.repo_id, api)
        (run_dir / CARD_NAME).write_text(str(card))
        return UploadPlan(settings, glue_benchmark.upload_files(run_dir), card)
    require_finished_run(run_dir)
    card = run_card(run_dir, saved, settings.repo_id, api)
    (run_dir / CARD_NAME).write_text(str(card))
    return UploadPlan(settings, run_files(run_dir), card)


def require_finished_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise FinetuneError(f"{run_dir} is not a directory")
    missing = [name for name in ("config.json", "metrics.json", RESOLVED_CONFIG_NAME) if not (run_dir / name).is_file()]
    if missing:
        raise FinetuneError(f"{run_dir} is not a finished finetune run (no {', '.join(missing)}); train it first")


def ignored(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED)


def run_files(run_dir: Path, prefix: str = "") -> list[tuple[Path, str]]:
    """Every file of a run directory except checkpoints and ignored files, with its path in the repo."""
    files = []
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if path.is_file() and not ignored(relative):
            files.append((path, f"{prefix}{relative.as_posix()}"))
    return files


def print_plan(plan: UploadPlan, out: TextIO) -> None:
    settings = plan.settings
    repo = settings.repo_id if "/" in settings.repo_id else f"<your namespace>/{settings.repo_id}"
    total = sum(path.stat().st_size for path, _ in plan.files)
    print("dry run: nothing is uploaded", file=out)
    print(f"repo: {repo} (revision: {settings.revision or 'main'}, private: {bool(settings.private)})", file=out)
    print(f"token: {'found' if token_available() else 'NOT found (a real push needs HF_TOKEN or hf auth login)'}",
          file=out)
    print(f"files ({len(plan.files)}, {human_size(total)}):", file=out)
    for path, name in plan.files:
        print(f"  {name}  ({human_size(path.stat().st_size)})", file=out)
    print(f"--- {CARD_NAME} ---", file=out)
    print(str(plan.card), file=out)


def token_available() -> bool:
    try:
        return bool(get_token())
    except Exception:
        return False


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


# ---------------------------------------------------------------------------------------------------------
# The model card of a run
# ---------------------------------------------------------------------------------------------------------

RUN_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Results

{{ results_table }}
{% if curves %}
## Training curves

![Training loss and evaluation metric]({{ curves }})
{% endif %}
## Training hyperparameters

{{ hyperparameters }}

## Reproduce

```bash
{{ command }}
```

## Framework versions

{{ versions }}
"""


def run_card(run_dir: Path, saved: dict, repo_id: str, api: HfApi | None) -> ModelCard:
    """The model card of a finished run, from its saved config, metrics and log history."""
    model, data = saved.get("model", {}), saved.get("data", {})
    task = describe_task(data)
    base = base_model_id(model.get("model_name_or_path"))
    metrics_file = json.loads((run_dir / "metrics.json").read_text())
    evaluated = metrics_file.get("eval", {})
    name = repo_id.split("/")[-1]
    results = eval_results(task, evaluated)
    card_data = ModelCardData(
        model_name=name,
        base_model=base,
        datasets=[task.dataset] if task.dataset else None,
        license=base_license(base, model.get("model_name_or_path"), api),
        library_name="transformers",
        pipeline_tag=task.hub_task_type,
        tags=[tag for tag in ("finetune", task.family, task.task_name) if tag],
        metrics=sorted({r.metric_type for r in results}) or None,
        eval_results=results or None,
    )
    curves = write_training_curves(run_dir, saved)
    trained_on = f"[{task.dataset}](https://huggingface.co/datasets/{task.dataset})" if task.dataset else "local files"
    if task.config_name:
        trained_on += f" (`{task.config_name}`)"
    source = f"[{base}](https://huggingface.co/{base})" if base else f"`{model.get('model_name_or_path')}`"
    return ModelCard.from_template(
        card_data,
        template_str=RUN_CARD_TEMPLATE,
        model_name=name,
        summary=f"{source} fine-tuned on {trained_on} for {task.hub_task_type} with "
        "`finetune` (transformers `Trainer`).",
        results_table=results_table(evaluated, task.metrics),
        curves=curves.name if curves else None,
        hyperparameters=hyperparameters_table(saved),
        command=reproduce_command(saved),
        versions=framework_versions(),
    )


def describe_task(data: dict) -> SimpleNamespace:
    """Family, preset, dataset id/config, Hub task type and declared metrics of a saved run's task."""
    from finetune.tasks import task_class

    family = data.get("task") or "glue"
    known = {k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__}
    try:
        cls = task_class(family)
        task = cls(SimpleNamespace(data=DataConfig(**known)))
        dataset, config_name = task.dataset_id()
        preset = task.preset
    except (FinetuneError, TypeError, AttributeError):
        cls, preset = None, None
        dataset, config_name = data.get("dataset_name"), data.get("dataset_config_name")
    return SimpleNamespace(
        family=family,
        task_name=data.get("task_name"),
        dataset=dataset,
        config_name=config_name,
        hub_task_type=getattr(cls, "hub_task_type", "text-classification"),
        metrics=tuple(getattr(preset, "metrics", ()) or ()),
        best_metric=getattr(preset, "best_metric", None),
    )


def is_score(name: str, value: Any) -> bool:
    """A quality metric (not loss, timing, counts or epoch)."""
    skip = ("runtime", "per_second", "loss", "epoch", "examples", "steps")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith(skip)


def scored_metrics(values: dict[str, Any], declared: tuple[str, ...]) -> dict[str, float]:
    """The declared metrics of a split when known, else every quality metric in it."""
    names = [m for m in declared if m in values] or [k for k, v in values.items() if is_score(k, v)]
    return {name: float(values[name]) for name in names if values.get(name) is not None}


def eval_results(task: SimpleNamespace, evaluated: dict[str, dict[str, Any]]) -> list[EvalResult]:
    """model-index entries: one per (split, metric), with the dataset id, config and split."""
    if not task.dataset:
        return []  # the Hub needs a dataset id to render a result
    results = []
    for split, values in evaluated.items():
        for metric, value in scored_metrics(values, task.metrics).items():
            results.append(
                EvalResult(
                    task_type=task.hub_task_type,
                    task_name=task.hub_task_type.replace("-", " ").title(),
                    dataset_type=task.dataset,
                    dataset_name=f"{task.dataset} {task.config_name}" if task.config_name else task.dataset,
                    dataset_config=task.config_name,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=f"{metric} ({split})",
                    metric_value=round(value, 4),
                )
            )
    return results


def results_table(evaluated: dict[str, dict[str, Any]], declared: tuple[str, ...]) -> str:
    rows = [
        f"| {split} | {metric} | {value:.4f} |"
        for split, values in evaluated.items()
        for metric, value in scored_metrics(values, declared).items()
    ]
    if not rows:
        return "No evaluation split."
    return "\n".join(["| split | metric | value |", "|---|---|---|", *rows])


def base_model_id(name_or_path: str | None) -> str | None:
    """The Hub id of the starting checkpoint: the id itself, or the id of its mirror copy; None for other paths."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if path.exists():
        root = mirror.mirror_root()
        try:
            return path.resolve().relative_to((root / "models").resolve()).as_posix() if root else None
        except ValueError:
            return None
    return name_or_path if name_or_path.count("/") <= 1 else None


def base_license(base: str | None, name_or_path: str | None, api: HfApi | None) -> str | None:
    """The base model's licence: from its card in a local folder or the mirror, else from the Hub."""
    candidates = [name_or_path, mirror.resolve(base, "models") if base else None]
    for candidate in candidates:
        card = Path(candidate).expanduser() / CARD_NAME if candidate else None
        if card is not None and card.is_file():
            found = (metadata_load(card) or {}).get("license")
            if found:
                return str(found)
    if base and api is not None:
        try:
            card_data = api.model_info(base).card_data
            return getattr(card_data, "license", None) if card_data else None
        except Exception:  # the licence is a nicety: a failed lookup must not stop the push
            return None
    return None


def write_training_curves(run_dir: Path, saved: dict) -> Path | None:
    from finetune.plots import training_curves

    state_file = run_dir / "trainer_state.json"
    if not state_file.is_file():
        return None
    history = json.loads(state_file.read_text()).get("log_history", [])
    metric = saved.get("training", {}).get("metric_for_best_model")
    return training_curves(history, metric, run_dir / CURVES_NAME)


def hyperparameters_table(saved: dict) -> str:
    rows = []
    for section, names in HYPERPARAMETERS.items():
        values = saved.get(section, {})
        rows += [f"| {name} | {values[name]} |" for name in names if values.get(name) not in (None, False, -1)]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def framework_versions() -> str:
    lines = []
    for package in FRAMEWORKS:
        try:
            lines.append(f"- {package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return "\n".join(lines)


def reproduce_command(saved: dict) -> str:
    """``finetune train RECIPE --flag value ...``: the settings in which the run differs from its recipe."""
    from finetune.config import parse_run_config

    recipe = saved.get("recipe")
    try:
        defaults = parse_run_config(recipe).to_dict()
    except FinetuneError:  # a recipe file that is gone: spell out everything that differs from the defaults
        recipe, defaults = None, parse_run_config(None).to_dict()
    # A run picks its task's metric for the best checkpoint by itself; only another choice is a flag.
    settled = saved.get("training", {}).get("metric_for_best_model") == describe_task(saved.get("data", {})).best_metric
    flags: list[str] = []
    for section in ("model", "data", "training"):
        for key, value in saved.get(section, {}).items():
            if any(part in key for part in NOT_REPRODUCED) or value is None:
                continue
            if settled and key in ("metric_for_best_model", "greater_is_better"):
                continue
            if value != defaults.get(section, {}).get(key):
                flags += [f"--{key}", flag_value(value)]
    return shlex.join(["finetune", "train", *([recipe] if recipe else []), *flags])


def flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)
