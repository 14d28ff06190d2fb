"""What every setting may be: ranges for numbers, choices for words, existence for paths, agreement between fields.

Each config dataclass calls ``check_section(self)`` from its ``__post_init__`` (the way ``TrainingArguments``
checks itself), so a bad value stops the run when the config is built: before any data or model is loaded
and before anything is written. A broken rule is a ``FinetuneError`` that names the flag, the value and
what is allowed; the command line prints it as one ``finetune: error:`` line with exit code 2.

The rules live in ``RULES`` (field name -> rule; names are unique across sections because they are all
flags of one parser). ``tests/test_settings_sweep.py`` walks every field of every section and tries bad
values against these rules, and fails when a numeric field has no rule.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune.errors import FinetuneError


def flag_value(name: str, value: Any) -> str:
    return f"--{name} {value}"


@dataclass(frozen=True)
class Number:
    """A finite number between ``low`` and ``high``, or one of ``special`` (values with a meaning of their own)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: > low; False: >= low
    high_open: bool = False
    integer: bool = False
    special: tuple[tuple[float, str], ...] = ()  # (value, what it means), e.g. max_steps -1
    kind: Literal["number"] = "number"

    def allowed(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        what = ("an integer " if self.integer else "a number ") + " and ".join(bounds)
        extra = [f"{value:g} ({meaning})" for value, meaning in self.special]
        return " or ".join([*extra, what.strip()])

    def problem(self, name: str, value: Any) -> str | None:
        if isinstance(value, (list, tuple)):  # a list setting (tune's ranges and choices): every item
            shown = " ".join(map(str, value))
            return next((f"--{name} {shown}: each value must be {self.allowed()}"
                         for item in value if self.problem(name, item)), None)
        if value is None or any(value == special for special, _ in self.special):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{flag_value(name, value)}: must be {self.allowed()}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"{flag_value(name, value)}: must be {self.allowed()}"
        return None


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (a tuple, or a function giving them when they come from an installed library).

    ``many``: a list, or a comma-separated string, of options. ``also``: a test for legal values outside
    the list (attention kernels from the Hub are named ``org/repo``).
    """

    options: tuple[str, ...] | Callable[[], Iterable[str]]
    many: bool = False
    also: Callable[[str], bool] | None = None
    kind: Literal["choice"] = "choice"

    def names(self) -> list[str]:
        return list(self.options() if callable(self.options) else self.options)

    def problem(self, name: str, value: Any) -> str | None:
        if value is None:
            return None
        items = value if isinstance(value, (list, tuple)) else (str(value).split(",") if self.many else [value])
        names = self.names()
        for item in items:
            item = getattr(item, "value", item)  # enums
            if str(item).strip() not in names and not (self.also and self.also(str(item))):
                if len(items) == 1:
                    return f"{flag_value(name, value)}: must be one of {', '.join(names)}"
                return f"{flag_value(name, value)}: {str(item).strip()!r} is not one of {', '.join(names)}"
        return None


def looks_local(value: str) -> bool:
    """A path rather than a Hub id: absolute, relative with ./ or ../, or from the home folder."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


@dataclass(frozen=True)
class LocalPath:
    """An existing file or folder. ``special``: words that are not paths (resume ``last``); ``if_local``: only
    values that look like paths are checked, others are Hub ids; ``containing``: a file the folder must hold."""

    what: Literal["file", "folder"]
    special: tuple[str, ...] = ()
    if_local: bool = False
    containing: str | None = None
    without_it: str = ""  # what a folder without ``containing`` is
    kind: Literal["path"] = "path"

    def problem(self, name: str, value: Any) -> str | None:
        if value is None or value in self.special or (self.if_local and not looks_local(str(value))):
            return None
        path = Path(str(value)).expanduser()
        exists = path.is_file() if self.what == "file" else path.is_dir()
        also = f" (or {', '.join(self.special)})" if self.special else ""
        if not exists:
            return f"{flag_value(name, value)}: no such {self.what}{also}"
        if self.containing and not (path / self.containing).is_file():
            return f"{flag_value(name, value)}: has no {self.containing}{self.without_it}"
        return None


@dataclass(frozen=True)
class Structured:
    """A JSON object (``{"key": value}``), or with ``file`` also the path of a file holding one;
    ``pairs``: instead ``key=value,key=value`` (TrainingArguments' optim_args)."""

    file: bool = False
    pairs: bool = False
    kind: Literal["structured"] = "structured"

    def problem(self, name: str, value: Any) -> str | None:
        if not isinstance(value, str) or value == "":  # None, a dict, or already built (AcceleratorConfig)
            return None
        text = str(value).strip()
        if self.pairs:
            if all(len(item.split("=")) == 2 and item.split("=")[0] for item in text.replace(" ", "").split(",")):
                return None
            return f"{flag_value(name, value)}: must be key=value pairs separated by commas"
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as error:
                return f"{flag_value(name, value)}: not valid JSON ({error.msg} at column {error.colno})"
            return None if isinstance(loaded, dict) else f"{flag_value(name, value)}: must be a JSON object"
        if self.file:
            if Path(text).expanduser().is_file():
                return None
            return f"{flag_value(name, value)}: no such file (or give a JSON object)"
        return f"{flag_value(name, value)}: must be a JSON object such as '{{\"key\": 1}}'"


Rule = Number | Choice | LocalPath | Structured


def at_least(low: int) -> Number:
    return Number(low=low, integer=True)


POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
FRACTION = Number(low=0, high=1)
# Steps given as a count (>= 1) or as a fraction of the training steps (< 1), TrainingArguments' convention.
STEPS_OR_FRACTION = Number(low=0, low_open=True)
MAX_BATCH_SIZE = 2**20
SEED = Number(low=0, high=2**32 - 1, integer=True)  # numpy's seed range
LOG_LEVELS = ("detail", "debug", "info", "warning", "error", "critical", "passive")


def attention_kernels() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def reporting_integrations() -> list[str]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ["none", "all", *INTEGRATION_TO_CALLBACK]


def dynamo_backends() -> list[str]:
    from accelerate.utils import DynamoBackend

    return [backend.value.lower() for backend in DynamoBackend]


RULES: dict[str, Rule] = {
    # model
    "model_name_or_path": LocalPath("folder", if_local=True),
    "tokenizer_name": LocalPath("folder", if_local=True),
    "attn_implementation": Choice(attention_kernels, also=lambda name: "/" in name),
    # data
    "train_file": LocalPath("file"),
    "validation_file": LocalPath("file"),
    "test_file": LocalPath("file"),
    "max_seq_length": at_least(1),
    "max_target_length": at_least(1),
    "max_train_samples": at_least(1),
    "max_eval_samples": at_least(1),
    "max_predict_samples": at_least(1),
    "max_final_eval_samples": at_least(1),
    "validation_split_percentage": Number(low=1, high=99, integer=True),
    "preprocessing_num_workers": at_least(1),
    # hub
    "hub_mirror": LocalPath("folder"),
    # generation
    "max_new_tokens": at_least(1),
    "min_new_tokens": at_least(0),
    "num_beams": at_least(1),
    "length_penalty": Number(),
    "no_repeat_ngram_size": at_least(0),
    # training: TrainingArguments' own fields (it checks few of them itself, and some only when training starts)
    # The Trainer allocates per-batch buffers of the configured size (a loss per example when evaluating),
    # whatever the data's size, so an absurd batch size fails in the middle of the run.
    "per_device_train_batch_size": Number(low=1, high=MAX_BATCH_SIZE, integer=True),
    "per_device_eval_batch_size": Number(low=1, high=MAX_BATCH_SIZE, integer=True),
    "gradient_accumulation_steps": at_least(1),
    "eval_accumulation_steps": at_least(1),
    "num_train_epochs": POSITIVE,
    "max_steps": Number(low=1, integer=True, special=((-1, "train for num_train_epochs"),)),
    # No upper bounds on rates and decays: a run that diverges stops at the first non-finite loss with one
    # line (finetune.callbacks), and the bound where that happens depends on the model and the optimizer.
    "learning_rate": NON_NEGATIVE,  # 0 is legal for the optimizers: the weights stay as they are
    "warmup_steps": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Number(low=0, high=1, high_open=True),
    "adam_beta2": Number(low=0, high=1, high_open=True),
    "adam_epsilon": POSITIVE,  # 0 divides by zero for parameters whose gradient is 0 (NaN loss)
    "max_grad_norm": Number(low=0),
    "label_smoothing_factor": FRACTION,
    "neftune_noise_alpha": NON_NEGATIVE,
    "torch_empty_cache_steps": at_least(1),
    "logging_steps": STEPS_OR_FRACTION,
    "eval_steps": STEPS_OR_FRACTION,
    "save_steps": STEPS_OR_FRACTION,
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": Number(low=0, integer=True),
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": at_least(0),
    "dataloader_prefetch_factor": at_least(1),
    "ddp_bucket_cap_mb": at_least(1),
    "ddp_timeout": at_least(1),
    "local_rank": Number(low=0, integer=True, special=((-1, "not distributed"),)),
    "group_by_length_window": at_least(0),
    "log_level": Choice(LOG_LEVELS),
    "log_level_replica": Choice(LOG_LEVELS),
    "report_to": Choice(reporting_integrations, many=True),
    "torch_compile_backend": Choice(dynamo_backends),
    "optim_args": Structured(pairs=True),
    "lr_scheduler_kwargs": Structured(),
    "activation_checkpointing_kwargs": Structured(),
    "gradient_checkpointing_kwargs": Structured(),
    "accelerator_config": Structured(file=True),
    "fsdp_config": Structured(file=True),
    "deepspeed": Structured(file=True),
    "torch_compile_mode": Choice(("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
    "dataloader_multiprocessing_context": Choice(("fork", "spawn", "forkserver")),
    "ddp_backend": Choice(("nccl", "gloo", "mpi", "ccl", "hccl", "cncl", "mccl", "xccl")),
    "early_stopping_patience": at_least(1),
    # tune (lists: every item is checked; see also AGREEMENT)
    "n_trials": at_least(1),
    "tune_seeds": at_least(1),
    "learning_rate_range": POSITIVE,
    "warmup_range": Number(low=0, high=1, high_open=True),  # a fraction of the training steps
    "weight_decay_range": NON_NEGATIVE,
    "batch_sizes": Number(low=1, high=MAX_BATCH_SIZE, integer=True),
    "epoch_choices": at_least(1),
    "pruner": Choice(("median", "none")),
    "backend": Choice(("optuna", "ray")),
    # peft (check_peft_settings in finetune.config adds the rules between them)
    "lora_r": at_least(1),
    "lora_alpha": POSITIVE,
    "lora_dropout": Number(low=0, high=1, high_open=True),
    "resume_from_checkpoint": LocalPath("folder", special=("last",), containing="trainer_state.json",
                                        without_it="; not a complete checkpoint"),
}


def section_problems(section: Any) -> list[str]:
    """Every rule the fields of one config dataclass break, then the rules between its fields."""
    problems = []
    for item in dataclasses.fields(section):
        rule = RULES.get(item.name)
        if rule is not None:
            problem = rule.problem(item.name, getattr(section, item.name))
            if problem:
                problems.append(problem)
    return problems + [p for p in (check(section) for check in AGREEMENT.get(type(section).__name__, ())) if p]


def check_section(section: Any) -> None:
    """Raise the first broken rule of one config dataclass as a one-line FinetuneError."""
    problems = section_problems(section)
    if problems:
        raise FinetuneError(problems[0])


def metric_problem(metric: str | None, known: frozenset[str] | None, reporter: str) -> str | None:
    """A --metric_for_best_model that ``reporter`` (a task) never reports; ``known`` None: not known in advance."""
    if metric and known is not None and metric.removeprefix("eval_") not in known:
        return f"--metric_for_best_model {metric}: must be one of {', '.join(sorted(known))} (what {reporter} reports)"
    return None


def new_tokens_in_order(generation: Any) -> str | None:
    if generation.min_new_tokens > generation.max_new_tokens:
        return (
            f"--min_new_tokens {generation.min_new_tokens}: must be <= --max_new_tokens ({generation.max_new_tokens})"
        )
    return None


def gguf_file_in_local_model(model: Any) -> str | None:
    folder = Path(model.model_name_or_path).expanduser()
    if model.gguf_file and folder.is_dir() and not (folder / model.gguf_file).is_file():
        return f"--gguf_file {model.gguf_file}: no such file in the model folder {model.model_name_or_path}"
    return None


def one_precision(training: Any) -> str | None:
    if training.bf16 and training.fp16:
        return "--bf16 and --fp16 are both true: choose one mixed precision"
    return None


def ranges_in_order(tune: Any) -> str | None:
    for name in ("learning_rate_range", "warmup_range", "weight_decay_range"):
        values = list(getattr(tune, name))
        if len(values) not in (1, 2) or values != sorted(values):
            return f"--{name} {' '.join(map(str, values))}: must be one value or 'low high' with low <= high"
    for name in ("batch_sizes", "epoch_choices"):
        if not getattr(tune, name):
            return f"--{name}: give at least one value"
    return None


def one_seed_on_ray(tune: Any) -> str | None:
    if tune.backend == "ray" and tune.tune_seeds > 1:
        return f"--tune_seeds {tune.tune_seeds}: the ray backend trains one seed per trial; use --backend optuna"
    return None


#: rules between the fields of one section, by dataclass name
AGREEMENT: dict[str, tuple[Callable[[Any], str | None], ...]] = {
    "ModelConfig": (gguf_file_in_local_model,),
    "GenerationSettings": (new_tokens_in_order,),
    "TrainConfig": (one_precision,),
    "TuneConfig": (ranges_in_order, one_seed_on_ray),
}
