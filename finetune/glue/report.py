"""The GLUE reports: ``glue_results.json`` (every number, per seed), ``glue_results.md`` (the table: per task
metrics, mean and std over seeds, and the average), ``glue_scores.png``, ``report.html`` (all of it on one page,
linking each task's best run report), and the folder's model card.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import HfApi, ModelCard

from finetune import adapters
from finetune.glue import CHART, RESULTS_JSON, RESULTS_MD, SUBMISSION_ZIP, TaskResult
from finetune.glue.submission import write_submission
from finetune.hub import card as cards
from finetune.hub import client
from finetune.hub.card import CARD_NAME
from finetune.hub.push import Files, FolderKind, run_files
from finetune.page import esc, image, page, section, table
from finetune.report import REPORT_NAME
from finetune.run_info import framework_versions
from finetune.tasks.glue import GLUE_DATASET


def glue_average(tasks: dict[str, dict]) -> tuple[float | None, list[str]]:
    """Mean of the task scores of the finished tasks that have validation scores (AX has none)."""
    scored = [n for n, r in tasks.items() if r["status"] == "done" and r.get("score")]
    if not scored:
        return None, []
    return float(np.mean([tasks[n]["score"]["mean"] for n in scored])), scored


def write_results(
    out: Path, model: str, seeds: list[int], passthrough: list[str], results: dict[str, TaskResult], final: bool = False
) -> dict:
    tasks = {name: asdict(result) for name, result in results.items()}
    passthrough = client.without_tokens(passthrough)  # recorded, printed and put in the card's command
    if final:
        write_submission(out, results, tasks)
    average, averaged = glue_average(tasks)
    document = {
        "model_name_or_path": model,
        "seeds": seeds,
        "train_flags": passthrough,
        "command": shlex.join(
            ["finetune", "glue", "--model_name_or_path", model, "--tasks", ",".join(results),
             "--seeds", ",".join(map(str, seeds)), "--output_dir", str(out), *passthrough]
        ),
        "tasks": tasks,
        "glue_average": average,
        "glue_average_tasks": averaged,
        "frameworks": framework_versions(),
    }
    (out / RESULTS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    if final:
        (out / RESULTS_MD).write_text(markdown_table(document))
        write_glue_report(out, document, write_chart(out, document))
    return document


def markdown_table(document: dict) -> str:
    """Per task: status, each metric (mean ± std over seeds, x100), the task score, and notes."""
    seeds = document["seeds"]
    lines = [
        f"# GLUE: {document['model_name_or_path']}",
        "",
        f"Validation scores x100, mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). "
        f"Train flags: `{' '.join(document['train_flags']) or '(recipe defaults)'}`.",
        "",
        "| Task | Status | Metrics | Score | Notes |",
        "|---|---|---|---|---|",
    ]
    for name, task in document["tasks"].items():
        metrics = "; ".join(
            f"{metric}{'' if split == 'validation' else f' ({split})'} {spread(stats)}"
            for split, values in task["metrics"].items()
            for metric, stats in values.items()
        )
        score = spread(task["score"]) if task.get("score") else ""
        notes = "; ".join(
            filter(None, [task.get("reason"), task.get("note"),
                          ", ".join(f"{f}: {n} rows" for f, n in task["submission"].items())])
        )
        lines.append(f"| {name.upper()} | {task['status']} | {metrics} | {score} | {notes} |")
    average = document["glue_average"]
    lines.append("")
    if average is None:
        lines.append("GLUE average: no task finished.")
    else:
        tasks = document["glue_average_tasks"]
        lines.append(f"**GLUE average over {len(tasks)} task(s) ({', '.join(tasks)}): {100 * average:.1f}**")
    return "\n".join(lines) + "\n"


def write_chart(out: Path, document: dict) -> Path | None:
    from finetune.plots import score_bars

    scores = {
        name.upper(): (100 * t["score"]["mean"], 100 * t["score"]["std"])
        for name, t in document["tasks"].items()
        if t["status"] == "done" and t.get("score")
    }
    if not scores:
        return None
    average = document["glue_average"]
    title = f"GLUE validation: {Path(document['model_name_or_path']).name} ({len(document['seeds'])} seed(s))"
    return score_bars(scores, out / CHART, title, None if average is None else 100 * average)


# ---------------------------------------------------------------------------------------------------------
# Publishing (used by `finetune push GLUE_OUT`)
# ---------------------------------------------------------------------------------------------------------

GLUE_CARD_BODY = """GLUE validation results of {{ source }}, fine-tuned separately on each task with the `finetune` GLUE
recipes. Each task's best-seed model is in the folder named after the task
(`AutoModelForSequenceClassification.from_pretrained("{{ repo_id }}", subfolder="rte")`).

{{ table }}

![GLUE scores]({{ chart }})

The GLUE server submission for the test sets is `{{ zip }}`.

"""


def model_card(out: Path, repo_id: str, api: HfApi | None) -> ModelCard:
    """A card whose model-index holds each task's validation metrics (mean over seeds)."""
    document = json.loads((out / RESULTS_JSON).read_text())
    model = document["model_name_or_path"]
    base = cards.base_model_id(model)
    results = [
        cards.eval_result("text-classification", task["dataset"], f"GLUE {name.upper()}", task["config"], split,
                          metric, stats["mean"])
        for name, task in document["tasks"].items()
        if task["status"] == "done"
        for split, values in task["metrics"].items()
        for metric, stats in values.items()
    ]
    # Tasks trained with --use_peft upload LoRA adapters (each task's best run under <task>/).
    lora = any(adapters.is_adapter_dir(out / task["best_run"]) for task in document["tasks"].values()
               if task.get("best_run"))
    return cards.model_card(
        GLUE_CARD_BODY,
        name=repo_id.split("/")[-1],
        base=base,
        name_or_path=model,
        datasets=[GLUE_DATASET],
        pipeline_tag="text-classification",
        tags=["finetune", "glue", *(["peft", "lora"] if lora else [])],
        results=results,
        command=document["command"],
        api=api,
        library_name="peft" if lora else "transformers",
        repo_id=repo_id,
        source=f"[{base}](https://huggingface.co/{base})" if base else f"`{model}`",
        table=(out / RESULTS_MD).read_text().split("\n", 2)[-1].strip(),
        chart=CHART,
        zip=SUBMISSION_ZIP,
        versions=document.get("frameworks") or framework_versions(),  # results written before versions were
    )


def upload_files(out: Path) -> Files:
    """The report files, and each finished task's best model under ``<task>/``."""
    names = (CARD_NAME, RESULTS_JSON, RESULTS_MD, CHART, SUBMISSION_ZIP)
    files = [(out / n, n) for n in names if (out / n).is_file()]
    document = json.loads((out / RESULTS_JSON).read_text())
    for name, task in document["tasks"].items():
        if task["status"] == "done" and task.get("runs") and task.get("best_run"):
            files += run_files(out / task["best_run"], prefix=f"{name}/")
    return files


#: how `finetune push` tells a GLUE folder (by its results file) and what it uploads from one
GLUE_FOLDER = FolderKind(is_one=lambda out: (out / RESULTS_JSON).is_file(), card=model_card, files=upload_files)


# -- report.html ------------------------------------------------------------------------------------------------


def glue_page(document: Mapping[str, Any], chart: Path | None) -> str:
    """The benchmark page of ``finetune glue``: per task status, metrics and score over seeds, the chart, and a
    link to each task's best-seed run report."""
    rows = []
    for name, task in document["tasks"].items():
        metric_cells = "<br>".join(
            f"{esc(metric)}{'' if split == 'validation' else f' ({esc(split)})'} {esc(spread(stats))}"
            for split, values in task.get("metrics", {}).items() for metric, stats in values.items()
        )
        best = task.get("best_run")
        link = f'<a href="{esc(best)}/{REPORT_NAME}">{esc(best)}</a>' if best else ""
        rows.append((esc(name.upper()), esc(task["status"]), metric_cells,
                     esc(spread(task["score"])) if task.get("score") else "", link,
                     esc(task.get("reason") or task.get("note") or "")))
    average = document.get("glue_average")
    seeds = document.get("seeds", [])
    facts = [("model", esc(document.get("model_name_or_path"))), ("seeds", esc(", ".join(map(str, seeds)))),
             ("GLUE average", "-" if average is None else f"{100 * average:.1f}"),
             ("command", f"<code>{esc(document.get('command', ''))}</code>")]
    body = ('<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"
            + section("tasks", "Tasks (validation, x100, mean ± std over seeds)",
                      table(("task", "status", "metrics", "score", "best run", "notes"), rows))
            + section("chart", "Scores", image(chart.read_bytes() if chart and chart.is_file() else None, "scores")))
    return page(f"GLUE: {Path(str(document.get('model_name_or_path'))).name}", body)


def spread(stats: Mapping[str, Any]) -> str:
    """A score over seeds, x100: mean, and std when there are several seeds."""
    shown = f"{100 * stats['mean']:.1f}"
    return shown + (f" ± {100 * stats['std']:.1f}" if len(stats.get("values", [])) > 1 else "")


def write_glue_report(out: str | Path, document: Mapping[str, Any], chart: Path | None) -> Path:
    path = Path(out) / REPORT_NAME
    path.write_text(glue_page(document, chart), encoding="utf-8")
    return path
