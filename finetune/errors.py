"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations

import os

USAGE_EXIT_CODE = 2


class FinetuneError(Exception):
    """A problem with what the user asked for (a bad id, a missing column, a malformed recipe).

    The CLI prints ``finetune: error: <message>`` and exits with code 2, without a traceback, so the
    message must say on its own what was wrong and where.
    """


#: Exit code of a run stopped by SIGTERM after saving a checkpoint: "run me again with
#: --resume_from_checkpoint last". launch/slurm.sh requeues on it; both read the same variable.
PREEMPTED_EXIT_CODE = int(os.environ.get("FINETUNE_PREEMPTED_EXIT_CODE", "143"))


class Preempted(Exception):
    """Training stopped on SIGTERM (preemption, time limit) after saving ``checkpoint``.

    Not a FinetuneError: nothing is wrong, and the exit code tells a scheduler to run the job again.
    """

    def __init__(self, checkpoint: str | None, step: int):
        self.checkpoint = checkpoint
        self.step = step
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(
            f"stopped by SIGTERM at step {step}; {where}; resume with the same command plus "
            "--resume_from_checkpoint last"
        )
