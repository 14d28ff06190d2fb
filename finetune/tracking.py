"""Experiment tracking: ``--report_to`` is TrainingArguments' own flag (tensorboard, trackio, mlflow, wandb, ...).

The default is transformers 5's ``none``: a run then writes only its own files (``trainer_state.json`` with
the log history and ``report.html`` with the curves), with no extra package, no side folders in the working
directory (MLflow's ``mlruns/``) and no login prompt or network (wandb). Tracking is one flag away, and the
four common integrations are optional extras: ``pip install -e ".[tensorboard]"``.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers.integrations import integration_utils

from finetune.errors import FinetuneError

#: integration -> (extra in pyproject.toml, transformers' check that its package is importable)
EXTRAS: dict[str, tuple[str, Callable[[], bool]]] = {
    "tensorboard": ("tensorboard", integration_utils.is_tensorboard_available),
    "trackio": ("trackio", integration_utils.is_trackio_available),
    "mlflow": ("mlflow", integration_utils.is_mlflow_available),
    "wandb": ("wandb", integration_utils.is_wandb_available),
}


def checked_report_to(report_to: list[str] | str | None) -> list[str]:
    """The integrations asked for (``tensorboard,mlflow`` is two), checked: one line for an unknown one or a
    missing package, where transformers would raise a traceback when the Trainer is created."""
    values = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [name.strip() for value in values for name in value.split(",") if name.strip() not in ("", "none")]
    if "all" in names:
        return integration_utils.get_available_reporting_integrations()
    known = integration_utils.INTEGRATION_TO_CALLBACK
    for name in names:
        if name not in known:
            raise FinetuneError(f"--report_to {name}: unknown integration (known: none, all, {', '.join(known)})")
        if name in EXTRAS and not EXTRAS[name][1]():
            extra = EXTRAS[name][0]
            raise FinetuneError(f'--report_to {name} needs the {extra} package: pip install -e ".[{extra}]"')
    return names
