"""The Hub client: the token, ``HfApi``, retries of transient failures, and one-line errors.

The token is ``--hub_token`` when given, else ``HF_TOKEN`` or the ``hf auth login`` cache through
``huggingface_hub.get_token``; it is handed to ``HfApi`` only, never printed, saved (pickles included:
see ``finetune.tokens.TokensNotPickled``) or put in an error message. Hub failures become
one-line :class:`FinetuneError` messages; transient ones (5xx, 429, connection errors) are retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from finetune import __version__, mirror
from finetune.errors import FinetuneError

T = TypeVar("T")

RETRY_ATTEMPTS = 4
TRANSIENT_STATUS = (429, 500, 502, 503, 504)


def hub_token(given: str | None = None) -> str:
    """The token given (``--hub_token``), else the user's (HF_TOKEN or the `hf auth login` cache); a one-line
    error when there is none."""
    if given:
        return given
    try:
        token = get_token()
    except Exception as error:  # an OIDC exchange that was asked for and failed
        raise FinetuneError(f"cannot get a Hugging Face token: {first_line(error)}") from None
    if not token:
        raise FinetuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry_run)")
    return token


def token_available(given: str | None = None) -> bool:
    if given:
        return True
    try:
        return bool(get_token())
    except Exception:
        return False


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


def without_tokens(argv: list[str]) -> list[str]:
    """Command-line flags as recorded in reports and reproduce commands: every ``--*_token`` flag left out."""
    kept: list[str] = []
    value_follows = False
    for arg in argv:
        if value_follows:
            value_follows = False
            continue
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name.endswith("_token"):
            value_follows = "=" not in arg
            continue
        kept.append(arg)
    return kept


def redacted(text: str, token: str | None) -> str:
    """Belt and braces: no message leaves this package with the token in it."""
    return text.replace(token, "***") if token else text
