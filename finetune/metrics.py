"""Task metrics through the ``evaluate`` library: GLUE's module for GLUE tasks, ``rouge`` for summaries,
``sacrebleu`` and ``chrf`` for translations, or any evaluate module a run names (``--metric``).

Metric ids resolve like models and datasets: ``glue`` is ``<mirror>/spaces/evaluate-metric/glue`` when the
mirror holds it, else the Hub's ``evaluate-metric/glue`` (what ``evaluate.load("glue")`` fetches). A task
builds its scorer once, so each module is loaded once per task, not per evaluation.

Modules compute in memory (``keep_in_memory=True``, one process's view): under several processes the Trainer
gathers every rank's predictions before ``compute_metrics``, so each rank scores the whole split itself and
evaluate's own cross-process gathering (arrow cache files and file-lock rendezvous, ``num_process > 1``) is
never used; nothing is written to evaluate's cache either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from finetune import mirror
from finetune.errors import FinetuneError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
HUB_NAMESPACE = "evaluate-metric"  # where the Hub keeps evaluate's canonical modules (glue, rouge, f1, ...)

# sacrebleu's metric classes take some options under other names than evaluate's modules do.
_SACREBLEU_OPTION_NAMES = {"use_effective_order": "effective_order"}


@dataclass(frozen=True)
class MetricSpec:
    """One evaluate module to compute: its id, its ``compute`` keyword arguments, and its config name."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    config_name: str | None = None
    #: the name a single-valued result is reported under (``f1``; ``f1_macro`` when f1 is asked for twice)
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name.rstrip("/").split("/")[-1])


def parse_metrics(text: str) -> tuple[MetricSpec, ...]:
    """Metric specs from ``--metric``: comma-separated evaluate ids, each with ``:key=value`` options.

    ``f1:average=macro,accuracy`` computes f1 with ``average="macro"`` and accuracy; values are read as YAML
    scalars (``1``, ``0.5``, ``true``, ``macro``); ``config_name=`` is passed to ``evaluate.load``. A metric
    named twice is reported under its name and option values (``f1_macro``, ``f1_micro``).
    """
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *options = item.split(":")
        kwargs: dict[str, Any] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or not key.strip():
                raise FinetuneError(f"--metric {item}: options are key=value after the name (e.g. f1:average=macro)")
            try:
                kwargs[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else ""
            except yaml.YAMLError as error:
                raise FinetuneError(f"--metric {item}: cannot read the value of {key.strip()}") from error
        config_name = kwargs.pop("config_name", None)
        specs.append(MetricSpec(name.strip(), tuple(kwargs.items()), None if config_name is None else str(config_name)))
    if not specs:
        raise FinetuneError("--metric names no metric (expected e.g. f1,accuracy or f1:average=macro)")
    return with_unique_labels(specs)


def with_unique_labels(specs: Sequence[MetricSpec]) -> tuple[MetricSpec, ...]:
    """Specs of a module asked for more than once are labelled by their option values as well."""
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.label] = counts.get(spec.label, 0) + 1
    labelled = []
    for spec in specs:
        label = spec.label
        if counts[label] > 1:
            options = [str(value) for _, value in spec.kwargs] + ([spec.config_name] if spec.config_name else [])
            label = "_".join([label, *options])
        labelled.append(MetricSpec(spec.name, spec.kwargs, spec.config_name, label))
    labels = [s.label for s in labelled]
    if len(set(labels)) != len(labels):
        raise FinetuneError(f"--metric: the same metric is asked for twice with the same options ({', '.join(labels)})")
    return tuple(labelled)


def best_metric(specs: Sequence[MetricSpec]) -> str:
    """The metric that picks the best checkpoint by default: the first one named (ROUGE: rougeL)."""
    return "rougeL" if specs[0].label == "rouge" else specs[0].label


def require_averages(specs: Sequence[MetricSpec], num_labels: int) -> None:
    """Refuse, before training, what scikit-learn would refuse at the first evaluation: binary-only
    precision/recall/F1 on more than two classes."""
    for spec in specs:
        binary_only = spec.name.rstrip("/").split("/")[-1] in ("f1", "precision", "recall")
        if binary_only and num_labels > 2 and not dict(spec.kwargs).get("average"):
            raise FinetuneError(
                f"--metric {spec.name} on {num_labels} classes needs an average: e.g. {spec.name}:average=macro"
            )


def module_id(name: str) -> str:
    """The Hub id of a metric: bare names are evaluate's canonical modules (``evaluate-metric/<name>``)."""
    return name if "/" in name else f"{HUB_NAMESPACE}/{name}"


def load_module(spec: MetricSpec) -> Any:
    """The evaluate module of ``spec``: a local path, its mirror copy, or the Hub's."""
    import evaluate  # imports transformers.pipelines: a second or more, paid only by runs that score

    def load(target: str) -> Any:
        return evaluate.load(target, spec.config_name, keep_in_memory=True)

    local = Path(spec.name).expanduser()
    if local.exists():  # a module script or folder of the user's own
        return load(str(local))
    try:
        return mirror.load_or_explain(load, module_id(spec.name), "spaces")
    except (ImportError, KeyError) as error:  # a module whose requirements are missing, or an unknown config
        raise FinetuneError(f"metric '{spec.name}': {mirror.first_line(error)}") from error


def scalars(result: Mapping[str, Any] | None) -> dict[str, float]:
    """The single numbers of a module's result (lists such as BLEU's precisions are left out)."""
    return {
        key: float(value)
        for key, value in (result or {}).items()
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    }


def named(spec: MetricSpec, values: dict[str, float]) -> dict[str, float]:
    """A module's own number (``f1`` of f1, or evaluate's generic ``score``) is reported under the spec's label;
    other keys (``matthews_correlation`` of glue) as the module names them."""
    own = (spec.name.rstrip("/").split("/")[-1], "score")
    return {(spec.label if key in own else key): value for key, value in values.items()}


class LabelScorer:
    """Classification / regression metrics of predicted against gold label ids (or scores)."""

    def __init__(self, specs: Sequence[MetricSpec], order: Sequence[str] = ()):
        self.specs = tuple(specs)
        self.modules = [load_module(spec) for spec in self.specs]
        #: result keys in the order a task reports them (GLUE: the leaderboard's order)
        self.order = tuple(order)

    def __getstate__(self) -> dict[str, Any]:
        # evaluate's modules are classes of packages it generates when loading (evaluate_modules.*), which another
        # process cannot import (a Ray Tune worker gets the Trainer pickled): a pickled scorer carries its specs
        # and loads the modules again where it is unpickled.
        return {**self.__dict__, "modules": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.modules = [load_module(spec) for spec in self.specs]

    def __call__(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        """The metrics, plus ``combined_score`` (their mean) when there are several, as run_glue.py reports."""
        results: dict[str, float] = {}
        for spec, module in zip(self.specs, self.modules, strict=True):
            computed = module.compute(predictions=predictions, references=references, **dict(spec.kwargs))
            results.update(named(spec, scalars(computed)))
        ordered = {key: results[key] for key in self.order if key in results}
        results = {**ordered, **results}
        if len(results) > 1:
            results["combined_score"] = float(np.mean(list(results.values())))
        return results


class TextScorer:
    """Scores of generated texts against one or more references per example, on a 0-100 scale.

    ``rouge``: mean F-measure over examples (stemmed; each example counts its best reference per ROUGE type;
    Lsum on one sentence per line). evaluate's own aggregate is a bootstrap median, so per-example scores are
    averaged here. ``sacrebleu`` and ``chrf``: corpus scores over every reference (a missing one is None), with
    sacrebleu's signature. Other modules get the references as lists and report their single numbers.
    """

    def __init__(self, specs: Sequence[MetricSpec], sentence_split: Any = None):
        self.specs = tuple(specs)
        self.modules = [load_module(spec) for spec in self.specs]
        self.sentence_split = sentence_split

    def __call__(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | str]:
        if not predictions:
            return {}
        results: dict[str, float | str] = {}
        for spec, module in zip(self.specs, self.modules, strict=True):
            name = spec.name.rstrip("/").split("/")[-1]
            if name == "rouge":
                results.update(self.rouge(module, spec, predictions, references))
            elif name in ("sacrebleu", "chrf"):
                results.update(self.sacrebleu(module, spec, name, predictions, references))
            else:
                computed = module.compute(predictions=list(predictions), references=[list(r) for r in references],
                                          **dict(spec.kwargs))
                results.update(named(spec, scalars(computed)))
        return results

    def rouge(self, module: Any, spec: MetricSpec, predictions: Sequence[str],
              references: Sequence[Sequence[str]]) -> dict[str, float]:
        kwargs = {"rouge_types": list(ROUGE_TYPES), "use_stemmer": True, **dict(spec.kwargs), "use_aggregator": False}
        lines = self.one_sentence_per_line
        per_example = module.compute(
            predictions=[lines(p) for p in predictions],
            # Always lists: evaluate then scores with RougeScorer.score_multi (the best reference per type).
            references=[[lines(r) for r in refs] for refs in references],
            **kwargs,
        )
        return {name: 100.0 * math.fsum(values) / len(values) for name, values in per_example.items()}

    def one_sentence_per_line(self, text: str) -> str:
        """rougeLsum reads one sentence per line; the other ROUGE types ignore line breaks."""
        return "\n".join(self.sentence_split(text)) if self.sentence_split else text

    @staticmethod
    def sacrebleu(module: Any, spec: MetricSpec, name: str, predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> dict[str, float | str]:
        width = max(len(refs) for refs in references)
        padded = [list(refs) + [None] * (width - len(refs)) for refs in references]
        computed = module.compute(predictions=list(predictions), references=padded, **dict(spec.kwargs))
        return {spec.label: float(computed["score"]), f"{spec.label}_signature": signature(name, spec, references)}


def signature(name: str, spec: MetricSpec, references: Sequence[Sequence[str]]) -> str:
    """sacrebleu's reproducibility signature of a score evaluate's module computed with the same options.

    The module returns no signature; sacrebleu builds it from the metric's options and the number of
    references per example (``var`` when it varies), which is all it depends on.
    """
    from sacrebleu.metrics import BLEU, CHRF

    options = {_SACREBLEU_OPTION_NAMES.get(k, k): v for k, v in spec.kwargs}
    metric = BLEU(**options) if name == "sacrebleu" else CHRF(**options)
    counts = {sum(r is not None for r in refs) for refs in references}
    metric.num_refs = counts.pop() if len(counts) == 1 else -1
    return str(metric.get_signature())


def predicted_labels(logits: np.ndarray, is_regression: bool) -> np.ndarray:
    """Class ids (argmax) for classification, the squeezed score for regression."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
