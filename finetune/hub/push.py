"""``finetune push RUN_DIR`` and ``finetune train --push_to_hub``: a run folder and its card, in one commit.

Both end in :func:`push_run`, which writes the model card (and the training-curve image) into the run
directory, then creates the repo (and branch) and uploads the run's files in one commit.

With ``hub_strategy=end`` (the default) the Trainer does not push at all: the model is uploaded once,
after training, together with its card. With ``every_save``, ``checkpoint`` or ``all_checkpoints`` the
Trainer's own machinery pushes during training, and the final upload with the card follows the same way.
Nothing in the run directory is changed by a failed push except the card and image written before it.

Other kinds of folder (a ``finetune glue`` output) bring their own card and file list as a
:class:`FolderKind`; the command line hands them in, so this package needs none of them.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from finetune.config import RESOLVED_CONFIG_NAME, load_saved_config
from finetune.errors import FinetuneError
from finetune.hub import card as cards
from finetune.hub import client
from finetune.hub.card import CARD_NAME
from finetune.run_info import RUN_INFO_NAME

#: never uploaded: checkpoints (optimizer state), the pickled TrainingArguments, hidden and lock files
IGNORED = ("checkpoint-*", "training_args.bin", ".*", "*.lock", "error.log")

Files = list[tuple[Path, str]]


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder other than a run (a ``finetune glue`` output): how to tell one, its card, its files."""

    is_one: Callable[[Path], bool]
    card: Callable[[Path, str, HfApi | None], ModelCard]
    files: Callable[[Path], Files]


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
    files: Files = field(default_factory=list)
    card: ModelCard | None = None


def main(argv: list[str], folder_kinds: Sequence[FolderKind] = ()) -> int:
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
    parser.add_argument(
        "--hub_token", default=None, help="Hub token with write access; default: HF_TOKEN or the `hf auth login` one"
    )
    args = parser.parse_args(argv)
    push_run(
        args.run_dir,
        token=args.hub_token,
        dry_run=args.dry_run,
        repo_id=args.hub_model_id,
        revision=args.hub_revision,
        private=args.hub_private_repo,
        commit_message=args.commit_message,
        folder_kinds=folder_kinds,
    )
    return 0


def prepare_push(config) -> None:
    """Before ``finetune train --push_to_hub`` trains: the token must be there, and the repo and branch the
    Trainer pushes checkpoints into must exist (with ``hub_strategy=end`` finetune pushes after training,
    with the card, and the Trainer does not push at all: see ``RunConfig.trainer_arguments``)."""
    if not config.training.push_to_hub or config.hub.dry_run:
        return
    client.hub_token(config.training.hub_token)  # fail now, not after hours of training
    if config.trainer_pushes() and config.training.process_index == 0:
        prepare_repo(config.training)


def prepare_repo(args, sleep: Callable[[float], None] = time.sleep) -> None:
    """The repo and branch the Trainer pushes checkpoints into (it expects both to exist)."""
    token = client.hub_token(args.hub_token)
    api = client.hub_api(token)
    wanted = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        repo_url = client.hub_call(
            lambda: api.create_repo(wanted, private=args.hub_private_repo, exist_ok=True), "creating", wanted, sleep
        )
        if args.hub_revision and args.hub_revision != "main":
            client.hub_call(
                lambda: api.create_branch(repo_url.repo_id, branch=args.hub_revision, exist_ok=True),
                "creating branch of", repo_url.repo_id, sleep,
            )
    except FinetuneError as error:
        raise FinetuneError(client.redacted(str(error), token)) from None


def push_run(
    run_dir: str | Path,
    config=None,
    *,
    token: str | None = None,
    dry_run: bool | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    out: TextIO | None = None,
    folder_kinds: Sequence[FolderKind] = (),
) -> str | None:
    """Push ``run_dir`` (a run, or a folder one of ``folder_kinds`` knows) with its card; returns the commit URL
    (None for a dry run).

    Settings come from the arguments, else from ``config`` (a RunConfig), else from the run's saved config;
    the token from ``token``, else ``config``, else HF_TOKEN / the login cache (a saved config never holds it).
    """
    out = out or sys.stdout
    run_dir = Path(run_dir)
    token = token or (config.training.hub_token if config is not None else None)
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
        plan = upload_plan(run_dir, saved, settings, None, folder_kinds)
        print_plan(plan, out, token)
        return None

    token = client.hub_token(token)
    api = client.hub_api(token)
    try:
        return upload(api, run_dir, saved, settings, sleep, out, folder_kinds)
    except FinetuneError as error:
        raise FinetuneError(client.redacted(str(error), token)) from None


def upload(
    api: HfApi, run_dir: Path, saved: dict, settings: PushSettings, sleep, out: TextIO,
    folder_kinds: Sequence[FolderKind] = (),
) -> str:
    """Create the repo (and branch), then one commit with every planned file."""
    wanted = settings.repo_id
    repo_url = client.hub_call(
        lambda: api.create_repo(wanted, private=settings.private, exist_ok=True), "creating", wanted, sleep
    )
    settings.repo_id = repo_url.repo_id
    if settings.revision and settings.revision != "main":
        client.hub_call(
            lambda: api.create_branch(settings.repo_id, branch=settings.revision, exist_ok=True),
            "creating branch of", settings.repo_id, sleep,
        )
    plan = upload_plan(run_dir, saved, settings, api, folder_kinds)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for path, name in plan.files]
    info = client.hub_call(
        lambda: api.create_commit(
            settings.repo_id, operations, commit_message=settings.commit_message, revision=settings.revision
        ),
        "uploading to", settings.repo_id, sleep,
    )
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{settings.repo_id}"
    print(f"pushed {len(plan.files)} files to https://huggingface.co/{settings.repo_id} ({url})", file=out)
    return url


# ---------------------------------------------------------------------------------------------------------
# What is uploaded
# ---------------------------------------------------------------------------------------------------------


def default_repo_name(run_dir: Path) -> str:
    return Path(run_dir).resolve().name


def upload_plan(
    run_dir: Path, saved: dict, settings: PushSettings, api: HfApi | None, folder_kinds: Sequence[FolderKind] = ()
) -> UploadPlan:
    """Write the card (and curves) into ``run_dir`` and list the files to upload."""
    kind = next((kind for kind in folder_kinds if kind.is_one(run_dir)), None)
    if kind is not None:
        card, files = kind.card(run_dir, settings.repo_id, api), kind.files
    else:
        require_finished_run(run_dir)
        card, files = cards.run_card(run_dir, saved, settings.repo_id, api), run_files
    (run_dir / CARD_NAME).write_text(str(card))  # before the files are listed: the card is one of them
    return UploadPlan(settings, files(run_dir), card)


def require_finished_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise FinetuneError(f"{run_dir} is not a directory")
    needed = ("config.json", "metrics.json", RESOLVED_CONFIG_NAME, RUN_INFO_NAME)
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise FinetuneError(f"{run_dir} is not a finished finetune run (no {', '.join(missing)}); train it first")


def ignored(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED)


def run_files(run_dir: Path, prefix: str = "") -> Files:
    """Every file of a run directory except checkpoints and ignored files, with its path in the repo."""
    files = []
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if path.is_file() and not ignored(relative):
            files.append((path, f"{prefix}{relative.as_posix()}"))
    return files


def print_plan(plan: UploadPlan, out: TextIO, token: str | None = None) -> None:
    settings = plan.settings
    repo = settings.repo_id if "/" in settings.repo_id else f"<your namespace>/{settings.repo_id}"
    total = sum(path.stat().st_size for path, _ in plan.files)
    found = "found" if client.token_available(token) else "NOT found (a real push needs HF_TOKEN or hf auth login)"
    print("dry run: nothing is uploaded", file=out)
    print(f"repo: {repo} (revision: {settings.revision or 'main'}, private: {bool(settings.private)})", file=out)
    print(f"token: {found}", file=out)
    print(f"files ({len(plan.files)}, {human_size(total)}):", file=out)
    for path, name in plan.files:
        print(f"  {name}  ({human_size(path.stat().st_size)})", file=out)
    print(f"--- {CARD_NAME} ---", file=out)
    print(str(plan.card), file=out)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
