"""The README's GLUE table: ``finetune glue`` results (mean ± std over seeds, x100) beside published dev scores.

    python benchmarks/glue_table.py runs/glue-minilm runs/glue-minilm-sst2 > glue_table.md

Each argument is a ``finetune glue`` output folder; their tasks are merged (a task in two folders is an
error), so a task run with different flags (SST-2 on a subset) can live in its own folder and still sit in
one table. The published rows are typed in below with their sources; they are other people's numbers,
measured with their own recipes, so the comparison is indicative, not like for like.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from finetune.glue.report import spread

TASKS = ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"]  # GLUE's order; the tasks the offline mirror has in full
TITLES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "wnli": "WNLI"}
# Every published row has these three, so they make the one average all rows share.
COMMON = ["sst2", "mrpc", "rte"]
DISPLAY_ONLY = {"--disable_tqdm", "--report_to", "--logging_steps"}


@dataclass(frozen=True)
class Published:
    name: str
    scores: dict[str, float]  # task -> score x100, as printed by the source
    source: str


PUBLISHED = [
    Published(
        "BERT-base",
        {"cola": 56.3, "sst2": 92.7, "mrpc": 88.6, "stsb": 89.0, "rte": 69.3, "wnli": 53.5},
        "Sanh et al. 2019, DistilBERT (arXiv:1910.01108), Table 1: GLUE dev, median of 5 seeds",
    ),
    Published(
        "DistilBERT",
        {"cola": 51.3, "sst2": 91.3, "mrpc": 87.5, "stsb": 86.9, "rte": 59.9, "wnli": 56.3},
        "Sanh et al. 2019, DistilBERT (arXiv:1910.01108), Table 1: GLUE dev, median of 5 seeds",
    ),
    Published(
        "MiniLM-L6-H384",
        {"sst2": 91.3, "mrpc": 86.6, "rte": 68.9},
        "model card of microsoft/xtremedistil-l6-h384-uncased, row 'MiniLM, 22M params, 5.3x': GLUE dev",
    ),
]


def merged_tasks(folders: list[Path]) -> tuple[dict[str, dict], dict[str, dict]]:
    """task -> its entry in glue_results.json, and task -> the document it came from."""
    tasks: dict[str, dict] = {}
    documents: dict[str, dict] = {}
    for folder in folders:
        document = json.loads((folder / "glue_results.json").read_text())
        for name, entry in document["tasks"].items():
            if entry["status"] != "done":
                continue
            if name in tasks:
                raise SystemExit(f"glue_table: {name} is in two folders; give each task once")
            tasks[name] = entry | {"folder": str(folder)}
            documents[name] = document
    return tasks, documents


def average(scores: dict[str, float], names: list[str]) -> str:
    return f"{statistics.fmean(scores[n] for n in names):.1f}" if all(n in scores for n in names) else "—"


def comparison_table(tasks: dict[str, dict], model: str, seeds: int) -> str:
    """One row per model: task scores, the average over the tasks run, and the average over COMMON."""
    ran = [t for t in TASKS if t in tasks]
    header = ["model", *(TITLES[t] for t in ran), f"average ({len(ran)} tasks)", "average (SST-2, MRPC, RTE)"]
    ours = {t: 100 * tasks[t]["score"]["mean"] for t in ran}
    rows = [[f"**{model}** (finetune, {seeds} seeds)", *(spread(tasks[t]["score"]) for t in ran),
             average(ours, ran), average(ours, COMMON)]]
    for published in PUBLISHED:
        rows.append([published.name, *(f"{published.scores[t]:.1f}" if t in published.scores else "—" for t in ran),
                     average(published.scores, ran), average(published.scores, COMMON)])
    return markdown([header, *rows])


def detail_table(tasks: dict[str, dict], documents: dict[str, dict]) -> str:
    """Per task: every metric (mean ± std), per-seed task scores, training seconds per seed, flags beside the recipe."""
    rows = [["task", "metrics (x100, mean ± std)", "task score per seed", "training s per seed", "flags"]]
    for name in (t for t in TASKS if t in tasks):
        entry = tasks[name]
        validation = entry["metrics"]["validation"]
        metrics = ", ".join(f"{metric} {spread(stats)}" for metric, stats in validation.items())
        seconds = [train_seconds(Path(entry["folder"]) / run) for run in entry["runs"].values()]
        flags = " ".join(flags_that_change_training(documents[name]["train_flags"])) or "—"
        rows.append([TITLES[name], metrics, " / ".join(f"{100 * v:.1f}" for v in entry["score"]["values"]),
                     " / ".join(f"{s:.0f}" for s in seconds), flags])
    return markdown(rows)


def flags_that_change_training(flags: list[str]) -> list[str]:
    """The runner's pass-through flags without the display-only ones (a flag and its value)."""
    shown, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in DISPLAY_ONLY:
            skip = True
        else:
            shown.append(flag)
    return shown


def train_seconds(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["train"]["train_runtime"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finetune glue output folders")
    args = parser.parse_args(argv)
    tasks, documents = merged_tasks(args.folders)
    first = documents[next(iter(tasks))]
    print(comparison_table(tasks, Path(first["model_name_or_path"]).name, len(first["seeds"])))
    print()
    print(detail_table(tasks, documents))
    print()
    for published in PUBLISHED:
        print(f"- {published.name}: {published.source}.")


if __name__ == "__main__":
    main()
