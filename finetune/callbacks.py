"""Trainer callbacks that every run gets: complete checkpoints, exact resume, preemption, divergence.

- ``CompleteCheckpoints``: a checkpoint counts only once every process has finished writing it
  (a marker file written last); ``--resume_from_checkpoint last`` skips the others.
- ``EpochSeededSampler``: the length-grouped sampler's order depends on (seed, epoch) only, so a run
  resumed in a later epoch sees the same batches as an uninterrupted one.
- ``CheckpointOnSigterm``: SIGTERM (preemption, time limit) saves a checkpoint at the next step and
  stops; the command line then exits with ``PREEMPTED_EXIT_CODE``.
- ``StopOnNonFiniteLoss``: a NaN or infinite training loss stops the run at the step it happens.
- ``early_stopping``: transformers' EarlyStoppingCallback when ``--early_stopping_patience`` is set.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import (
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from finetune.config import RunConfig
from finetune.errors import FinetuneError

#: Written into checkpoint-N/ after every process has finished writing the checkpoint.
COMPLETE_MARKER = "finetune_checkpoint_complete"

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def default_callbacks(config: RunConfig) -> list[TrainerCallback]:
    callbacks = [CompleteCheckpoints(), EpochSeededSampler(), CheckpointOnSigterm(), StopOnNonFiniteLoss()]
    if config.training.early_stopping_patience is not None:
        callbacks.append(early_stopping(config.training))
    return callbacks


def early_stopping(args: TrainingArguments) -> EarlyStoppingCallback:
    """transformers' EarlyStoppingCallback, after checking that the run evaluates and keeps its best model.

    The callback itself only asserts (a traceback) or warns; these are the user's settings, so one line each.
    """
    patience = args.early_stopping_patience
    if patience < 1:
        raise FinetuneError(f"early_stopping_patience must be at least 1, not {patience}")
    if args.eval_strategy == IntervalStrategy.NO:
        raise FinetuneError(
            "early_stopping_patience needs evaluations during training: eval_strategy epoch or steps and a "
            "validation split"
        )
    if not args.load_best_model_at_end:
        raise FinetuneError("early_stopping_patience needs load_best_model_at_end true (the stop keeps the best model)")
    if args.metric_for_best_model is None:
        raise FinetuneError("early_stopping_patience needs metric_for_best_model")
    return EarlyStoppingCallback(early_stopping_patience=patience)


# ---------------------------------------------------------------------------------------------------------
# Complete checkpoints
# ---------------------------------------------------------------------------------------------------------


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint-N folder with the highest N whose writing finished, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = {
        int(match.group(1)): entry
        for entry in folder.iterdir()
        if (match := _CHECKPOINT_NAME.match(entry.name)) and entry.is_dir() and is_complete_checkpoint(entry)
    }
    return str(steps[max(steps)]) if steps else None


class CompleteCheckpoints(TrainerCallback):
    """Marks a checkpoint complete once all processes have written their part of it.

    The Trainer writes ``checkpoint-N/`` in place (model, optimizer, RNG states per process, and
    ``trainer_state.json``), so a kill during the write leaves a folder that looks like a checkpoint.
    ``on_save`` runs after all of that on every process; the marker is created by an atomic rename.
    """

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        PartialState().wait_for_everyone()  # other ranks write their RNG state (and FSDP/DeepSpeed shards)
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            write_atomically(folder / COMPLETE_MARKER, f"{state.global_step}\n")


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------
# Data order that survives a resume
# ---------------------------------------------------------------------------------------------------------


def length_grouped_sampler(dataloader: Any) -> LengthGroupedSampler | None:
    """The LengthGroupedSampler inside an (accelerate-prepared, possibly sharded) data loader."""
    pending, seen = [dataloader], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, LengthGroupedSampler):
            return node
        pending += [getattr(node, "batch_sampler", None), getattr(node, "sampler", None)]
    return None


class EpochSeededSampler(TrainerCallback):
    """Seeds the length-grouped sampler with (seed + epoch) at the start of every epoch.

    transformers builds LengthGroupedSampler without a generator: alone it draws from the global torch
    RNG, under accelerate from a generator seeded once. Either way the order of epoch e depends on
    everything drawn before, which a run resumed in epoch e has not drawn, so it would see other
    batches. (A RandomSampler needs no help: accelerate swaps in a sampler seeded by epoch.)
    """

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        sampler = length_grouped_sampler(kwargs.get("train_dataloader"))
        if sampler is None:
            return
        seed = (args.data_seed if args.data_seed is not None else args.seed) + int(state.epoch or 0)
        if sampler.generator is None:
            sampler.generator = torch.Generator()
        # Seeded in place: accelerate keeps a reference to this generator to keep ranks in step.
        sampler.generator.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any: all ranks must take the same branch into a save."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def is_epoch_end(state: TrainerState) -> bool:
    # The Trainer sets epoch = e + (step + 1) / steps_in_epoch: a whole number exactly at an epoch's end.
    return float(state.epoch or 0).is_integer()


class CheckpointOnSigterm(TrainerCallback):
    """On SIGTERM, finish the current step, save a checkpoint, and stop training.

    The handler only sets a flag; the ranks agree on it at the end of each optimizer step so that all of
    them enter the (collective) save together. Evaluations already due at that step still run, so the
    resumed run's history matches an uninterrupted one.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopping = False
        self.checkpoint: str | None = None
        self.step = 0
        self._previous_handler: Any = None
        self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def install(self) -> None:
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        except ValueError:  # not the main thread: leave the default behaviour
            self._installed = False

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
            self._installed = False

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        self.install()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.stopping or not any_process(self.requested, args.device):
            return control
        self.stopping = True
        self.step = state.global_step
        control.should_training_stop = True
        # At an epoch's last step the epoch-end evaluation comes first; on_epoch_end asks for the save.
        if not is_epoch_end(state):
            control.should_save = True
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not self.stopping:
            return control
        if is_epoch_end(state):
            control.should_save = True
        else:  # stopped mid-epoch and already saved: no epoch-end evaluation of a partial epoch
            control.should_evaluate = False
            control.should_save = False
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.stopping:
            return
        self.checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # What train() would still do costs time the scheduler may not give: reloading the best model, and
        # (save_total_limit=1) deleting every checkpoint but the best one, i.e. the one just written.
        args.load_best_model_at_end = False
        args.save_total_limit = None

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self.restore()


def preemption(trainer: Trainer) -> CheckpointOnSigterm | None:
    """The trainer's SIGTERM callback if it stopped the run, else None."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, CheckpointOnSigterm) and callback.stopping:
            return callback
    return None


def release_signal_handlers(trainer: Trainer) -> None:
    """Put back the SIGTERM handler, also when training ended with an exception."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, CheckpointOnSigterm):
            callback.restore()


# ---------------------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------------------


class NonFiniteLoss(FinetuneError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops the run with a one-line error at the optimizer step whose loss is NaN or infinite.

    Callbacks see only the losses that are logged, and ``logging_nan_inf_filter`` (on by default)
    replaces non-finite ones, so a forward hook on the model reads every micro-batch's loss (or, when
    the Trainer computes the loss itself, e.g. with label smoothing, the logits it is computed from).
    The check stays on the device until the step's end, where all ranks agree on the verdict.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None  # [any NaN, any inf] in the current step
        self._hook: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        self._bad = torch.zeros(2, device=args.device)
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._check_output)

    def _check_output(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or self._bad is None:
            return
        value = output.get("loss") if isinstance(output, dict) else None
        if value is None:
            value = output.get("logits") if isinstance(output, dict) else None
        if not isinstance(value, torch.Tensor):
            return
        value = value.detach()
        found = torch.stack([torch.isnan(value).any(), torch.isinf(value).any()]).to(self._bad)
        self._bad = torch.maximum(self._bad, found)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._bad is None:
            return control
        bad = self._bad
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        nan, inf = (bool(v) for v in bad.tolist())
        if nan or inf:
            self.remove_hook()
            kind = "NaN" if nan else "infinite"
            raise NonFiniteLoss(
                f"training loss became {kind} at step {state.global_step} (epoch {state.epoch:.2f}); stopped "
                "without saving this step. Lower --learning_rate or raise --warmup_steps, check the data and "
                "fp16 settings, then start again or resume from an earlier checkpoint"
            )
        bad.zero_()
        return control

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        self.remove_hook()
