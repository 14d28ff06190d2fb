"""Model cards: the card of a finished run, and the shared pieces every finetune card is built from.

A card is ``huggingface_hub``'s ``ModelCard``: YAML metadata (base model, datasets, licence carried from
the base model, ``model-index`` results the Hub renders), then the text: a summary, the results, the
command that reproduces the run and the framework versions. A run's card is built from what the run
recorded when it trained (``run_info.json``, its config file, metrics and log history), so it says the
same whichever machine pushes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

from finetune import mirror
from finetune.run_info import RunInfo

CARD_NAME = "README.md"
CURVES_NAME = "training_curves.png"
HYPERPARAMETERS = {
    "training": (
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "seed", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay",
        "bf16", "fp16", "metric_for_best_model", "early_stopping_patience", "class_weights",
    ),
    "data": ("max_seq_length", "max_train_samples", "max_eval_samples"),
}

#: every card starts with its metadata and title, and ends with how to reproduce it and the versions used
CARD_HEAD = """---
{{ card_data }}
---

# {{ model_name }}

"""
CARD_FOOTER = """## Reproduce

```bash
{{ command }}
```

## Framework versions

{{ versions }}
"""
RUN_CARD_BODY = """{{ summary }}

## Results

{{ results_table }}
{% if adapter %}
## LoRA adapter

{{ adapter }}
{% endif %}{% if curves %}
## Training curves

![Training loss and evaluation metric]({{ curves }})
{% endif %}
## Training hyperparameters

{{ hyperparameters }}

"""


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


def model_card(
    body: str,
    *,
    name: str,
    base: str | None,
    name_or_path: str | None,
    datasets: list[str] | None,
    pipeline_tag: str,
    tags: list[str],
    results: list[EvalResult],
    command: str,
    versions: dict[str, str],
    api: HfApi | None,
    library_name: str = "transformers",
    **fields: Any,
) -> ModelCard:
    """A card from ``body`` (a jinja template) between the common head and footer."""
    card_data = ModelCardData(
        model_name=name,
        base_model=base,
        datasets=datasets,
        license=base_license(base, name_or_path, api),
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=tags,
        metrics=sorted({r.metric_type for r in results}) or None,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_HEAD + body + CARD_FOOTER,
        model_name=name,
        command=command,
        versions="\n".join(f"- {package} {version}" for package, version in versions.items()),
        **fields,
    )


def eval_result(
    task_type: str, dataset: str, dataset_name: str, config: str | None, split: str, metric: str, value: float
) -> EvalResult:
    """One model-index entry: a metric of one split of one dataset (configuration)."""
    return EvalResult(
        task_type=task_type,
        task_name=task_type.replace("-", " ").title(),
        dataset_type=dataset,
        dataset_name=dataset_name,
        dataset_config=config,
        dataset_split=split,
        metric_type=metric,
        metric_name=f"{metric} ({split})",
        metric_value=round(value, 4),
    )


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


# ---------------------------------------------------------------------------------------------------------
# The card of a run
# ---------------------------------------------------------------------------------------------------------


def run_card(run_dir: Path, saved: dict, repo_id: str, api: HfApi | None) -> ModelCard:
    """The model card of a finished run, from what it recorded: run_info.json, config, metrics, log history."""
    info = RunInfo.read(run_dir)
    name_or_path = saved.get("model", {}).get("model_name_or_path")
    base = base_model_id(name_or_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluated = metrics.get("eval", {})
    curves = write_training_curves(run_dir, info.best_metric)
    trained_on = f"[{info.dataset}](https://huggingface.co/datasets/{info.dataset})" if info.dataset else "local files"
    if info.dataset_config:
        trained_on += f" (`{info.dataset_config}`)"
    source = f"[{base}](https://huggingface.co/{base})" if base else f"`{name_or_path}`"
    lora = lora_description(run_dir, saved, metrics)
    summary = f"{source} fine-tuned on {trained_on} for {info.hub_task_type} with `finetune` (transformers `Trainer`)"
    if lora is not None:
        summary += lora.summary
    return model_card(
        RUN_CARD_BODY,
        name=repo_id.split("/")[-1],
        base=base,
        name_or_path=name_or_path,
        datasets=[info.dataset] if info.dataset else None,
        pipeline_tag=info.hub_task_type,
        tags=[tag for tag in ("finetune", info.family, info.task_name, *(lora.tags if lora else ())) if tag],
        results=eval_results(info, evaluated),
        command=info.command,
        versions=info.frameworks,
        api=api,
        library_name=lora.library if lora else "transformers",
        summary=summary + ".",
        results_table=results_table(evaluated, info.metrics),
        adapter=lora.table if lora else None,
        curves=curves.name if curves else None,
        hyperparameters=hyperparameters_table(saved, info.precision),
    )


#: adapter_config.json keys shown on the card, with the names the flags use
ADAPTER_SETTINGS = (
    ("r", "lora_r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
    ("target_modules", "lora_target_modules"), ("modules_to_save", "lora_modules_to_save"),
    ("use_dora", "use_dora"), ("use_rslora", "use_rslora"), ("task_type", None),
)


def lora_description(run_dir: Path, saved: dict, metrics: dict) -> SimpleNamespace | None:
    """What the card says about a LoRA run (an adapter, or an adapter merged into the weights); None otherwise."""
    from finetune import adapters

    adapter = adapters.adapter_summary(run_dir)
    settings = saved.get("peft", {})
    if adapter is None and not settings.get("use_peft"):
        return None
    rows = []
    for key, flag in ADAPTER_SETTINGS:
        value = adapter.get(key) if adapter is not None else settings.get(flag) if flag else None
        if isinstance(value, (list, tuple, set)):
            value = ", ".join(sorted(map(str, value))) if len(value) <= 12 else f"{len(value)} modules"
        if value not in (None, False, ""):
            rows.append(f"| {flag or key} | {value} |")
    counts = metrics.get("parameters") or {}
    if counts.get("trainable") and counts.get("total"):
        share = 100 * counts["trainable"] / counts["total"]
        rows.append(f"| trainable parameters | {counts['trainable']:,} of {counts['total']:,} ({share:.2f}%) |")
    if adapter is not None:
        summary = (": a LoRA adapter trained with `peft` (the base weights stay frozen). Load it with "
                   "`peft.AutoPeftModel...from_pretrained` or `finetune evaluate`; `finetune merge` folds it into the "
                   "base weights")
        library, tags = "peft", ("peft", "lora")
    else:
        summary = ": a LoRA adapter trained with `peft`, merged into the base weights (a full model)"
        library, tags = "transformers", ("lora",)
    table = "\n".join(["| setting | value |", "|---|---|", *rows])
    return SimpleNamespace(summary=summary, library=library, tags=tags, table=table)


def is_score(name: str, value: Any) -> bool:
    """A quality metric (not loss, timing, counts or epoch)."""
    skip = ("runtime", "per_second", "loss", "epoch", "examples", "steps")
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith(skip)


def scored_metrics(values: dict[str, Any], declared: tuple[str, ...]) -> dict[str, float]:
    """The declared metrics of a split when known, else every quality metric in it."""
    names = [m for m in declared if m in values] or [k for k, v in values.items() if is_score(k, v)]
    return {name: float(values[name]) for name in names if values.get(name) is not None}


def eval_results(info: RunInfo, evaluated: dict[str, dict[str, Any]]) -> list[EvalResult]:
    """model-index entries: one per (split, metric), with the dataset id, config and split."""
    if not info.dataset:
        return []  # the Hub needs a dataset id to render a result
    dataset_name = f"{info.dataset} {info.dataset_config}" if info.dataset_config else info.dataset
    return [
        eval_result(info.hub_task_type, info.dataset, dataset_name, info.dataset_config, split, metric, value)
        for split, values in evaluated.items()
        for metric, value in scored_metrics(values, info.metrics).items()
    ]


def results_table(evaluated: dict[str, dict[str, Any]], declared: tuple[str, ...]) -> str:
    rows = [
        f"| {split} | {metric} | {value:.4f} |"
        for split, values in evaluated.items()
        for metric, value in scored_metrics(values, declared).items()
    ]
    if not rows:
        return "No evaluation split."
    return "\n".join(["| split | metric | value |", "|---|---|---|", *rows])


def write_training_curves(run_dir: Path, metric: str | None) -> Path | None:
    from finetune.plots import training_curves

    state_file = run_dir / "trainer_state.json"
    if not state_file.is_file():
        return None
    history = json.loads(state_file.read_text()).get("log_history", [])
    return training_curves(history, metric, run_dir / CURVES_NAME)


def hyperparameters_table(saved: dict, precision: str = "") -> str:
    rows = []
    for section, names in HYPERPARAMETERS.items():
        values = saved.get(section, {})
        rows += [f"| {name} | {values[name]} |" for name in names if values.get(name) not in (None, False, -1)]
    if precision:  # what the run computed in and why it was decided so (finetune.precision)
        rows.append(f"| precision | {precision} |")
    return "\n".join(["| setting | value |", "|---|---|", *rows])
