"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class FinetuneError(Exception):
    """A problem with what the user asked for (a bad id, a missing column, a malformed recipe).

    The CLI prints ``finetune: error: <message>`` and exits with code 2, without a traceback, so the
    message must say on its own what was wrong and where.
    """
