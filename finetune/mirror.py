"""Hub ids resolved against an offline mirror laid out like the Hub.

A mirror is a folder holding ``models/<org>/<name>/``, ``datasets/<org>/<name>/`` and
``spaces/<org>/<name>/`` (``evaluate`` metric modules live in ``spaces/evaluate-metric/``). An id present
there loads from it; any other id goes to the Hub unchanged, so the same recipe runs online and
offline. The mirror is named by ``--hub_mirror`` or the ``FINETUNE_HUB_MIRROR`` environment variable;
the CLI copies the flag into the variable so that every process under ``accelerate launch`` sees it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from finetune.errors import FinetuneError

MIRROR_ENV = "FINETUNE_HUB_MIRROR"

RepoKind = Literal["models", "datasets", "spaces"]
T = TypeVar("T")


def mirror_root() -> Path | None:
    """The mirror folder from the environment, or None when no mirror is configured."""
    root = os.environ.get(MIRROR_ENV)
    return Path(root).expanduser() if root else None


def use_mirror(root: str | os.PathLike | None) -> None:
    """Make ``root`` the mirror for this process and the processes it starts."""
    if root is None:
        return
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FinetuneError(f"hub mirror {root} is not a directory")
    os.environ[MIRROR_ENV] = str(path)


def resolve(repo_id: str, kind: RepoKind) -> str:
    """A local path for ``repo_id``: itself if it is a path, its mirror copy if mirrored, else the id."""
    if Path(repo_id).expanduser().exists():
        return str(Path(repo_id).expanduser())
    root = mirror_root()
    if root is not None and (root / kind / repo_id).is_dir():
        return str(root / kind / repo_id)
    return repo_id


def places_tried(repo_id: str, kind: RepoKind) -> str:
    """Where ``resolve`` looked, for error messages."""
    root = mirror_root()
    places = [f"mirror {root / kind / repo_id}"] if root is not None else ["no mirror set"]
    places.append(f"the Hugging Face Hub ({kind[:-1]} '{repo_id}')")
    return ", ".join(places)


def load_or_explain(loader: Callable[[str], T], repo_id: str, kind: RepoKind) -> T:
    """``loader(resolved_path)``, turning 'not found / unreachable' into a one-line FinetuneError."""
    target = resolve(repo_id, kind)
    try:
        return loader(target)
    except (OSError, FileNotFoundError, ValueError, ConnectionError) as error:
        if target != repo_id or Path(repo_id).exists():
            raise  # the files are here, so the problem is in them: keep the real error
        raise FinetuneError(
            f"cannot load {kind[:-1]} '{repo_id}': tried {places_tried(repo_id, kind)} "
            f"({type(error).__name__}: {first_line(error)})"
        ) from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
