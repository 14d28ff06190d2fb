"""Typed run configuration: recipes (YAML), command-line overrides, and the resolved config file.

Seven dataclasses describe a run. Their field docs (``metadata["help"]``) are the ``--help`` text, and
flag names follow ``run_glue.py``, ``TrainingArguments`` and (for LoRA) trl's ``ModelConfig`` so that users'
habits carry over. A recipe is a YAML file with one section per dataclass (``model``, ``data``, ``training``,
``hub``, ``generation``, ``tune``, ``peft``); values from the command line override it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import HubStrategy, IntervalStrategy, SaveStrategy

from finetune import metrics
from finetune.distributed import launch_setting_defaults
from finetune.errors import FinetuneError
from finetune.precision import decided_precision
from finetune.run_info import as_flags
from finetune.tasks import FAMILIES, task_class
from finetune.tokens import TokensNotPickled
from finetune.validation import check_section, metric_problem


@dataclass
class ModelConfig:
    """Which pretrained checkpoint to start from and how to load it."""

    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Hub id or local path of the pretrained checkpoint (or of a finetune run directory)."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file inside the checkpoint repo (e.g. SmolLM2-135M-Instruct.Q4_1.gguf). It is "
            "dequantized once and the dense copy is cached, so later runs load it directly."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer id or path, when it differs from the model's."}
    )
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint on the Hub."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2. Default: the model's best available."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Classification: when the checkpoint already has a classification head for other labels (e.g. "
            "2 outputs, but the data has 5 classes or is a regression), start a new head instead of stopping with "
            "an error (run_glue.py's flag). A head of the right size is relabelled and its weights kept."
        },
    )

    def __post_init__(self) -> None:
        check_section(self)  # finetune/validation.py: every field's rule, before anything is loaded


@dataclass
class DataConfig:
    """What to train and evaluate on, and how to tokenize it."""

    task: str = field(
        default="glue",
        metadata={
            "help": "Task family: glue (sentence classification), summarization or translation.",
            "choices": list(FAMILIES),
        },
    )
    task_name: str | None = field(
        default=None,
        metadata={
            "help": "Preset of the task family: a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, ax), "
            "a summarization or translation preset. Presets fill in dataset, columns and metrics."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset id on the Hub (or mirror); default: the preset's."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Dataset configuration name; default: the preset's."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training file: csv, tsv, json, jsonl or parquet."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same formats)."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file (same formats) for predict."})
    text_column: str | None = field(
        default=None, metadata={"help": "Column with the (first) input text; default: the preset's, else 'sentence'."}
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Column with the second text of a sentence pair, if any."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Column with the label; default 'label'."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Inputs are truncated to this many tokens (padding is dynamic per batch)."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every example to max_seq_length (what run_glue.py does; slower, kept for comparison)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many examples."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Truncate each evaluation set to this many examples (generation tasks: only the evaluations "
            "during training; the final evaluation generates for the whole split)."
        },
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Truncate the prediction set to this many examples."}
    )
    max_final_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Generation tasks: truncate each evaluation set to this many examples for the evaluation after "
            "training and `finetune evaluate` (default: the whole split)."
        },
    )
    summary_column: str | None = field(
        default=None, metadata={"help": "Summarization: column with the reference summary; default: the preset's."}
    )
    source_lang: str | None = field(
        default=None, metadata={"help": "Translation: source language key of the `translation` column (e.g. en)."}
    )
    target_lang: str | None = field(
        default=None, metadata={"help": "Translation: target language key of the `translation` column (e.g. ro)."}
    )
    source_lang_code: str | None = field(
        default=None,
        metadata={"help": "Tokenizer source language code of multilingual models (mBART en_XX, NLLB eng_Latn)."},
    )
    target_lang_code: str | None = field(
        default=None,
        metadata={"help": "Tokenizer target language code of multilingual models (mBART ro_RO, NLLB ron_Latn)."},
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token generation must start with (mBART-50, NLLB: the target language code). Default: "
            "target_lang_code when it is set."
        },
    )
    source_prefix: str | None = field(
        default=None,
        metadata={"help": "Text put before every source for T5-style models (e.g. 'summarize: ')."},
    )
    max_target_length: int = field(
        default=128, metadata={"help": "Generation tasks: reference texts are truncated to this many tokens."}
    )
    validation_split_percentage: int | None = field(
        default=None,
        metadata={
            "help": "Carve a validation split of this percentage out of the train split (the same rows in every "
            "run), for data that comes as one file."
        },
    )
    metric: str | None = field(
        default=None,
        metadata={
            "help": "Metrics to compute instead of the task's: comma-separated evaluate modules (ids on the Hub or "
            "mirror, or local paths), each with optional compute options after colons, e.g. "
            "'f1:average=macro,accuracy'. The first one picks the best checkpoint unless metric_for_best_model is set."
        },
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Re-tokenize instead of reading the datasets cache."}
    )

    def __post_init__(self) -> None:
        check_section(self)  # finetune/validation.py: every field's rule, before anything is loaded


@dataclass
class HubConfig:
    """Where models come from offline, and what a push would do."""

    hub_mirror: str | None = field(
        default=None,
        metadata={
            "help": "Folder laid out like the Hub (models/<org>/<name>, datasets/<org>/<name>, spaces/evaluate-metric/"
            "<metric>); ids found there load "
            "from it, others from the Hub. Default: $FINETUNE_HUB_MIRROR."
        },
    )
    dry_run: bool = field(
        default=False, metadata={"help": "With push_to_hub: print what would be uploaded instead of uploading."}
    )

    def __post_init__(self) -> None:
        check_section(self)  # finetune/validation.py: every field's rule, before anything is loaded


@dataclass
class GenerationSettings:
    """How summarization and translation models generate text (saved as the model's generation_config.json)."""

    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per example."})
    min_new_tokens: int = field(
        default=0, metadata={"help": "Fewest tokens generated per example (EOS is suppressed until then)."}
    )
    num_beams: int = field(default=1, metadata={"help": "Beam search width; 1 is greedy decoding (fastest)."})
    length_penalty: float = field(
        default=1.0, metadata={"help": "With beams: >1 favours longer outputs, <1 shorter ones."}
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Never repeat an n-gram of this size in one output (0: no limit)."}
    )

    def __post_init__(self) -> None:
        check_section(self)  # finetune/validation.py: every field's rule, before anything is loaded


@dataclass
class TuneConfig:
    """The search space and budget of `finetune tune` (optuna through Trainer.hyperparameter_search)."""

    n_trials: int = field(default=10, metadata={"help": "Trials in the search (a resumed search runs only the rest)."})
    tune_seeds: int = field(
        default=1,
        metadata={
            "help": "Train each trial this many times, with seeds seed, seed+1, ...; the trial scores the mean of "
            "their best evaluations (small GLUE tasks move a point or more between seeds)."
        },
    )
    learning_rate_range: list[float] = field(
        default_factory=lambda: [1.0e-5, 2.0e-4],
        metadata={"help": "Learning rate: low high, sampled log-uniformly (one value: fixed)."},
    )
    batch_sizes: list[int] = field(
        default_factory=lambda: [16, 32], metadata={"help": "per_device_train_batch_size choices (categorical)."}
    )
    epoch_choices: list[int] = field(
        default_factory=lambda: [3, 5], metadata={"help": "num_train_epochs choices (categorical)."}
    )
    warmup_range: list[float] = field(
        default_factory=lambda: [0.0, 0.2],
        metadata={"help": "warmup_steps as a fraction of training (< 1): low high, uniform (one value: fixed)."},
    )
    weight_decay_range: list[float] = field(
        default_factory=lambda: [0.0, 0.1], metadata={"help": "weight_decay: low high, uniform (one value: fixed)."}
    )
    pruner: str = field(
        default="median",
        metadata={
            "help": "Stop hopeless trials early: median (optuna MedianPruner on the per-evaluation metric, after "
            "2 finished trials) or none."
        },
    )
    backend: str = field(
        default="optuna",
        metadata={
            "help": "optuna (in this process; study in output_dir/tune.db) or ray (Ray Tune: trials on a local or "
            "RAY_ADDRESS cluster, one seed per trial; pip install 'finetune[ray]')."
        },
    )
    study_name: str | None = field(
        default=None, metadata={"help": "Name of the optuna study in output_dir/tune.db; default: the recipe's name."}
    )

    def __post_init__(self) -> None:
        check_section(self)  # finetune/validation.py: every field's rule, before anything is loaded


@dataclass
class PeftSettings:
    """Parameter-efficient fine-tuning with peft's LoRA (names follow trl's ModelConfig and peft's LoraConfig)."""

    use_peft: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter (peft) instead of every weight; the run saves the adapter."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r (LoraConfig.r).", "aliases": ["--r"]})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input during training."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get LoRA: 'all-linear' (every linear layer except the output layer and the task "
            "head) or module names such as q_proj v_proj (LoraConfig.target_modules).",
            "aliases": ["--target_modules"],
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter, besides the ones added automatically (the "
            "classification head and any weight the checkpoint lacks) (LoraConfig.modules_to_save).",
            "aliases": ["--modules_to_save"],
        },
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale by alpha/sqrt(r)."})
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes: on a CUDA GPU, or on the "
                  "CPU with bitsandbytes >= 0.49)."},
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={"help": "Load the frozen base weights in 8-bit (bitsandbytes: on a CUDA GPU, or on the CPU with "
                  "bitsandbytes >= 0.49)."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "After training, merge the adapter into the base weights and save the full model instead."},
    )

    def __post_init__(self) -> None:
        check_section(self)  # finetune/validation.py: every field's rule, before anything is loaded


def _training_default(name: str, value: Any, help: str | None = None) -> Any:
    """A TrainingArguments field with our default and, optionally, our help text."""
    parent = TrainingArguments.__dataclass_fields__[name]
    metadata = dict(parent.metadata)
    if help:
        metadata["help"] = help
    return field(default=value, metadata=metadata)


@dataclass
class TrainConfig(TokensNotPickled, TrainingArguments):
    """``TrainingArguments`` with defaults for fine-tuning: evaluate and save each epoch, keep the best."""

    output_dir: str | None = _training_default(
        "output_dir", None, "Run directory for checkpoints, model, metrics and predictions. Default: runs/<recipe>."
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (its old files may be replaced)."}
    )
    eval_strategy: IntervalStrategy | str = _training_default("eval_strategy", "epoch")
    save_strategy: SaveStrategy | str = _training_default("save_strategy", "epoch")
    load_best_model_at_end: bool = _training_default("load_best_model_at_end", True)
    save_total_limit: int | None = _training_default("save_total_limit", 1)
    logging_steps: float = _training_default("logging_steps", 20)
    per_device_train_batch_size: int = _training_default("per_device_train_batch_size", 32)
    per_device_eval_batch_size: int = _training_default("per_device_eval_batch_size", 64)
    warmup_steps: float = _training_default("warmup_steps", 0.1)
    weight_decay: float = _training_default("weight_decay", 0.01)
    train_sampling_strategy: str = _training_default("train_sampling_strategy", "group_by_length")
    group_by_length_window: int | None = field(
        default=0,
        metadata={
            "help": "With train_sampling_strategy=group_by_length: how many batches are sorted by length together; "
            "0: the whole training set (least padding), the batches then come in random order. None: transformers' "
            "windows of up to 50 batches."
        },
    )
    torch_compile: bool | None = field(
        default=None,
        metadata={
            "help": "torch.compile the model (inductor: each repeated layer compiled once, dynamic sequence length). "
            "Default: decided per run, on only when the planned optimizer steps exceed the break-even measured for "
            "this device (finetune/compile.py, BENCHMARKS.md); the decision is logged. On this project's 2-core CPU "
            "compiled steps measured slower than eager, so CPU runs stay eager unless this is true."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Decoder-only models on summarization/translation: train on each batch concatenated into one "
            "row without padding (DataCollatorWithFlattening; position_ids restart per example and keep the "
            "examples apart). Saves the compute spent on padding; batch shapes then vary by total length."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "Decoder-only models on summarization/translation: compute the training loss from the final "
            "hidden states of the labelled positions, 1024 at a time, so the batch's full vocabulary-wide logits "
            "never exist (finetune/generation/chunked_loss.py; same loss and gradients). Off on several processes "
            "(DDP), under FSDP/DeepSpeed and for heads with logit scaling or soft-capping; false: the model's own "
            "loss from full logits."
        },
    )
    hub_strategy: HubStrategy | str = _training_default("hub_strategy", "end")
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop training after this many evaluations in a row without improvement of "
            "metric_for_best_model (transformers' EarlyStoppingCallback); the best checkpoint is kept. Needs "
            "evaluations (eval_strategy epoch or steps) and load_best_model_at_end."
        },
    )
    class_weights: str | None = field(
        default=None,
        metadata={
            "help": "Classification: weighted cross-entropy for imbalanced labels. 'auto': inverse label frequency "
            "in the training set, normalised so that the mean weight per training example is 1; or one weight per "
            "label in the dataset's label order, comma-separated (w1,w2,...). The run's config records the weights."
        },
    )

    def __post_init__(self) -> None:
        # Our rules first: TrainingArguments checks few values itself, and some only when training starts.
        check_section(self)
        super().__post_init__()


CONFIG_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainConfig,
    "hub": HubConfig,
    "generation": GenerationSettings,
    "tune": TuneConfig,
    "peft": PeftSettings,
}
RESOLVED_CONFIG_NAME = "finetune_config.yaml"
#: hub_strategy values with which the Trainer pushes during training (``end``: finetune pushes once, after it)
TRAINER_PUSH_STRATEGIES = ("every_save", "checkpoint", "all_checkpoints")
#: what a Trainer that never trains (evaluate, predict) needs: no evaluation schedule, no best model to reload
INFERENCE_SETTINGS: dict[str, Any] = {"eval_strategy": "no", "load_best_model_at_end": False}


@dataclass
class RunConfig:
    """Everything one run needs, as parsed from recipe + overrides."""

    model: ModelConfig
    data: DataConfig
    training: TrainConfig
    hub: HubConfig
    recipe: str | None = None
    #: the precision the run computes in and why (finetune.precision), decided at parse time
    precision: str = ""
    explicit: frozenset[str] = frozenset()  # fields the recipe or the command line set
    #: the settings as given (a caller's overrides as flags, then the command line): the reproduce command's
    #: source; never saved as such (it may hold a token)
    typed: tuple[str, ...] = ()
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    tune: TuneConfig = field(default_factory=TuneConfig)
    peft: PeftSettings = field(default_factory=PeftSettings)

    def to_dict(self) -> dict[str, Any]:
        """Sections as plain YAML-able values; token fields are redacted by TrainingArguments."""
        training = {k: v for k, v in self.training.to_dict().items() if not k.startswith("_")}
        return {
            "recipe": str(self.recipe) if self.recipe else None,
            "precision": self.precision,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "training": training,
            "hub": dataclasses.asdict(self.hub),
            "generation": dataclasses.asdict(self.generation),
            "tune": dataclasses.asdict(self.tune),
            "peft": dataclasses.asdict(self.peft),
        }

    def to_yaml(self) -> str:
        """What ``finetune_config.yaml`` holds (and ``--print_config`` prints)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=1000)  # one line per setting

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / RESOLVED_CONFIG_NAME
        path.write_text(self.to_yaml())
        return path

    def replace_training(self, **changes: Any) -> None:
        """Swap in new training arguments that differ by ``changes``; the parsed object is never edited.

        ``dataclasses.replace`` builds the arguments again, so ``TrainingArguments.__post_init__`` derives
        from the final values (mixed precision from bf16, greater_is_better from the metric) instead of
        leaving an edited field out of step with what it derived. Only for what the data alone decides.
        """
        self.training = dataclasses.replace(self.training, **changes)

    def trainer_pushes(self) -> bool:
        """Whether the Trainer pushes during training; otherwise finetune pushes once, after it, with the card."""
        strategy = getattr(self.training.hub_strategy, "value", self.training.hub_strategy)
        return self.training.push_to_hub and not self.hub.dry_run and strategy in TRAINER_PUSH_STRATEGIES

    def trainer_arguments(self) -> TrainConfig:
        """The Trainer's own copy of the arguments: what the Trainer and its callbacks change while they run
        (a hyperparameter search per trial, a SIGTERM stop) stays out of the run's settings. The Trainer must
        not push a model without its card (it would, from ``save_model``) when finetune pushes after training."""
        return dataclasses.replace(self.training, push_to_hub=self.trainer_pushes())


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line and exit code 2 (argparse prints usage too)."""

    def error(self, message: str) -> NoReturn:
        raise FinetuneError(message)


def argument_parser(prog: str = "finetune train") -> HfArgumentParser:
    # No abbreviations: a mistyped --learning_rat must be an error, not a silent prefix match.
    return _Parser(list(CONFIG_SECTIONS.values()), prog=prog, allow_abbrev=False)


# ---------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, Path]:
    """Recipe name -> file, for the YAML recipes shipped inside the package."""
    folder = resources.files("finetune.recipes")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith((".yaml", ".yml"))
    }


def recipe_path(name_or_path: str) -> Path:
    """The file of a shipped recipe name, or the given path if it is a file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    recipes = shipped_recipes()
    if name_or_path in recipes:
        return recipes[name_or_path]
    raise FinetuneError(f"no recipe '{name_or_path}': not a file and not a shipped recipe (see `finetune recipes`)")


def recipe_description(path: Path) -> str:
    """The first comment line of a recipe, which says what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read_recipe(path: Path) -> dict[str, Any]:
    """Flat {field: value} from a recipe's sections, checking every key is a known field."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise FinetuneError(f"malformed YAML in recipe {path}{at}: {getattr(error, 'problem', error)}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise FinetuneError(f"recipe {path} must be a mapping of sections {sorted(CONFIG_SECTIONS)}")
    flat: dict[str, Any] = {}
    for section, values in document.items():
        if section not in CONFIG_SECTIONS:
            raise FinetuneError(
                f"unknown section '{section}' in recipe {path}; expected one of {', '.join(CONFIG_SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise FinetuneError(f"section '{section}' of recipe {path} must be a mapping of field: value")
        known = {f.name for f in dataclasses.fields(CONFIG_SECTIONS[section])}
        aliases = field_aliases()
        for key, value in values.items():
            key = aliases.get(key, key) if aliases.get(key) in known else key
            if key not in known:
                raise FinetuneError(f"unknown key '{key}' in section '{section}' of recipe {path}")
            flat[key] = value
    return flat


def field_aliases() -> dict[str, str]:
    """Alternative flag names (without dashes) -> field name, e.g. peft's ``r`` for trl's ``lora_r``."""
    return {
        alias.lstrip("-"): f.name
        for section in CONFIG_SECTIONS.values()
        for f in dataclasses.fields(section)
        for alias in f.metadata.get("aliases", [])
    }


def _as_default(value: Any) -> Any:
    # argparse type-converts string defaults, so scalars given as strings reach the same conversion as
    # command-line values (YAML reads "1e-4" as a string, for instance).
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return value
    return str(value)


def parse_run_config(
    recipe: str | None = None, argv: list[str] | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """A RunConfig from a recipe (name or path), command-line style ``argv`` and/or a dict of overrides.

    The settings are final when this returns: what follows from other settings (:func:`derived_settings`)
    is decided here and handed to the dataclasses' constructors, so TrainingArguments are built once, with
    the values they are used with.
    """
    parser = argument_parser()
    given = read_recipe(recipe_path(recipe)) if recipe else {}
    if overrides:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise FinetuneError(f"unknown setting(s): {', '.join(unknown)}")
        given.update(overrides)
    parser.set_defaults(**{k: _as_default(v) for k, v in given.items()})
    namespace, unused = parser.parse_known_args(args=list(argv or []))
    if unused:
        raise FinetuneError(f"invalid setting: some arguments are not settings: {' '.join(unused)}")
    aliases = field_aliases()  # --r is lora_r
    explicit = set(given) | {aliases.get(name, name) for name in (arg[2:].split("=")[0] for arg in argv or []
                                                                  if arg.startswith("--"))}
    precision = decided_precision(vars(namespace), explicit)  # bf16 or fp32, and use_cpu for bf16 on a CPU
    values = {**vars(namespace), **derived_settings(vars(namespace), explicit, recipe), **precision.settings}
    from finetune.tracking import checked_report_to  # transformers' integrations: imported only when parsing

    values["report_to"] = checked_report_to(values.get("report_to"))  # "tensorboard,mlflow"; one line if missing
    try:
        sections = {
            name: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})
            for name, cls in CONFIG_SECTIONS.items()
        }
    except (ValueError, TypeError, ImportError, OSError) as error:  # TrainingArguments' own checks
        raise FinetuneError(f"invalid setting: {error}".splitlines()[0]) from None
    check_peft_settings(sections["peft"], explicit)
    check_best_metric(sections["data"], sections["training"])
    typed = (*as_flags(overrides or {}), *(argv or []))
    return RunConfig(**sections, recipe=recipe, precision=precision.reason, explicit=frozenset(explicit), typed=typed)


def check_best_metric(data: DataConfig, training: TrainConfig) -> None:
    """The metric that picks the best checkpoint must be one the task reports (else: a KeyError after an epoch)."""
    # With --metric the run reports the metrics named there (under names their options decide), not the task's.
    names = None if data.metric else task_class(data.task).metric_names_of(data.task_name)
    problem = metric_problem(
        training.metric_for_best_model,
        names,
        f"{data.task} task {data.task_name}" if data.task_name else f"{data.task} on custom data",
    )
    if problem:
        raise FinetuneError(problem)


def check_peft_settings(peft: PeftSettings, explicit: set[str]) -> None:
    """Refuse LoRA settings that cannot work, before anything is loaded."""
    if not peft.use_peft:
        defaults = PeftSettings()
        given = sorted(explicit & {f.name for f in dataclasses.fields(PeftSettings)} - {"use_peft"})
        given = [name for name in given if getattr(peft, name) != getattr(defaults, name)]
        if given:
            raise FinetuneError(f"{given[0]} is a LoRA setting, but use_peft is false; add --use_peft true")
        return
    if peft.lora_r <= 0:
        raise FinetuneError(f"lora_r (LoRA rank) must be a positive integer, got {peft.lora_r}")
    if peft.lora_alpha <= 0:
        raise FinetuneError(f"lora_alpha must be positive, got {peft.lora_alpha}")
    if not 0 <= peft.lora_dropout < 1:
        raise FinetuneError(f"lora_dropout must be in [0, 1), got {peft.lora_dropout}")
    if not peft.lora_target_modules:
        raise FinetuneError("lora_target_modules is empty; use all-linear or module names such as q_proj v_proj")
    if peft.load_in_4bit and peft.load_in_8bit:
        raise FinetuneError("load_in_4bit and load_in_8bit exclude each other; choose one")
    if peft.load_in_4bit or peft.load_in_8bit:
        problem = quantization_problem("load_in_4bit" if peft.load_in_4bit else "load_in_8bit")
        if problem:
            raise FinetuneError(problem)


#: the first bitsandbytes release whose CPU backend QLoRA was run on here (4-bit NF4 and 8-bit, with backward)
BITSANDBYTES_CPU = (0, 49)


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None; read from its metadata, so nothing is imported."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as 0.50.2 or 0.49.0.dev0."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def quantization_problem(flag: str) -> str | None:
    """Why ``flag`` (load_in_4bit/8bit) cannot run here, or None.

    bitsandbytes is needed everywhere; without a CUDA GPU it runs on its CPU backend, which older releases lack.
    Checked from the package metadata: importing bitsandbytes takes seconds and settings are parsed often.
    """
    version = installed_version("bitsandbytes")
    cuda = torch.cuda.is_available()
    install = "pip install 'finetune[qlora]'"
    if version is None:
        where = "" if cuda else " (there is no CUDA GPU here, so it would run on its CPU backend, >= 0.49)"
        return f"{flag} (QLoRA) needs bitsandbytes, which is not installed{where}: {install}"
    if not cuda and release(version) < BITSANDBYTES_CPU:
        return (f"{flag} (QLoRA) without a CUDA GPU needs bitsandbytes >= 0.49 for its CPU backend; there is no CUDA "
                f"GPU here and bitsandbytes {version} is installed: {install}")
    return None


def derived_settings(values: dict[str, Any], explicit: set[str], recipe: str | None) -> dict[str, Any]:
    """What follows from the other settings, for the fields that the recipe and the command line leave unset.

    * ``output_dir``: ``runs/<recipe>`` (else ``runs/<task_name or family>``);
    * ``metric_for_best_model``: the task's own metric (F1 for MRPC, ROUGE-L for summarization, ...), from
      the family's preset table, so no model or data is loaded; TrainingArguments then sets
      ``greater_is_better`` from it;
    * (beside these, ``finetune.precision`` decides the precision: bf16 autocast where the device computes
      bf16 natively, a GPU with bf16 or a CPU with AMX or AVX512-BF16 read from its flags at run time, fp32
      elsewhere; a recipe, the command line or an accelerate config that sets mixed precision decides instead);
    * on a GPU, two dataloader workers (on a CPU they would take cores from the model);
    * without a GPU, no pinned memory (pinning needs an accelerator; on a CPU it only warns);
    * what the launch implies (``finetune.distributed.launch_setting_defaults``: gloo for DeepSpeed on CPU).
    """
    derived: dict[str, Any] = {k: v for k, v in launch_setting_defaults().items() if k not in explicit}
    if "output_dir" not in explicit:  # TrainingArguments would fill in its own generic name
        name = Path(str(recipe)).stem if recipe else (values["task_name"] or values["task"])
        derived["output_dir"] = str(Path("runs") / name)
    if "metric_for_best_model" not in explicit:
        if values.get("metric"):  # --metric: the first metric named
            derived["metric_for_best_model"] = metrics.best_metric(metrics.parse_metrics(values["metric"]))
        else:
            derived["metric_for_best_model"] = task_class(values["task"]).best_metric_of(values["task_name"])
    if not torch.cuda.is_available():
        if "dataloader_pin_memory" not in explicit:
            derived["dataloader_pin_memory"] = False
        return derived
    if "dataloader_num_workers" not in explicit:
        derived["dataloader_num_workers"] = 2
    return derived


def load_saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run wrote into its directory (empty if there is none)."""
    path = Path(run_dir) / RESOLVED_CONFIG_NAME
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def print_recipes(stream=None) -> None:
    stream = stream or sys.stdout
    recipes = shipped_recipes()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}", file=stream)


def help_requested(argv: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)
