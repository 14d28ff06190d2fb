"""Equal metric in bf16 and fp32: the full shipped GLUE recipes over 3 seeds, and one SmolLM2 + LoRA run.

bf16 autocast becomes a CPU default only where its mean is within the seed spread of fp32's, so this runs,
for each of glue-cola (Matthews correlation), glue-stsb (regression: Pearson/Spearman) and glue-mrpc (F1),
the recipe as shipped (all epochs, best checkpoint) with seeds 42, 43, 44 through ``finetune glue``, once
with ``--bf16 false`` and once with ``--bf16 true``; then ``summarization-scitldr`` with LoRA on a stated
subset (``SCITLDR``) in both precisions, one seed. Every run goes through the real CLI in a subprocess.

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/precision.py --out runs/precision

Resumable: it is the same command again. ``finetune glue`` keeps finished seeds and resumes a stopped one
from its checkpoint, and a finished SciTLDR run (its ``metrics.json``) is not trained again. After each
run it writes ``--json`` (default ``benchmarks/results/precision.json``): per recipe, the task's
``metric_for_best_model`` per seed (``{"glue-mrpc": {"fp32": [...], "bf16": [...]}, ...}``), and beside it
the means, standard deviations, the verdict and the CPU the runs had.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402  (benchmarks/ is not a package)

GLUE_TASKS = ("cola", "stsb", "mrpc")  # fastest first, so that a stopped session leaves whole tasks
SEEDS = "42,43,44"
PRECISIONS = ("fp32", "bf16")
#: each recipe's metric_for_best_model (the checkpoint kept is the best by it)
BEST_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1"}
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: the generation run: SmolLM2-135M + LoRA with the full SciTLDR run's settings (README), on the first 400
#: training rows (one epoch: 50 steps of 4 x 2) and scored on the first 100 validation rows
SCITLDR = ["--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "2e-4",
           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_train_samples", "400",
           "--max_final_eval_samples", "100", "--eval_strategy", "no", "--load_best_model_at_end", "false",
           "--save_strategy", "steps", "--save_steps", "10", "--save_total_limit", "2"]
SCITLDR_METRIC = "rougeL"


def bf16_flag(precision: str) -> list[str]:
    return ["--bf16", "true" if precision == "bf16" else "false"]


def glue_command(task: str, precision: str, out: Path) -> list[str]:
    return ["finetune", "glue", "--model_name_or_path", MODEL, "--tasks", task, "--seeds", SEEDS,
            "--output_dir", str(out / precision), "--disable_tqdm", "true", *bf16_flag(precision)]


def scitldr_command(precision: str, out: Path) -> list[str]:
    run = out / f"scitldr-{precision}"
    resume = ["--resume_from_checkpoint", "last"] if any(run.glob("checkpoint-*")) else []
    return ["finetune", "train", "summarization-scitldr", "--output_dir", str(run), "--disable_tqdm", "true",
            *SCITLDR, *bf16_flag(precision), *resume]


def glue_values(out: Path, task: str, precision: str) -> list[float] | None:
    """The recipe metric of each seed, from each seed's metrics.json (None until all seeds finished).

    Read per seed rather than from ``glue_results.json``: that file describes the last ``finetune glue``
    invocation only, and each task here is its own invocation.
    """
    values = []
    for seed in SEEDS.split(","):
        path = out / precision / task / f"seed-{seed}" / "metrics.json"
        if not path.is_file():
            return None
        values.append(round(json.loads(path.read_text())["eval"]["validation"][BEST_METRIC[task]], 6))
    return values


def scitldr_values(out: Path, precision: str) -> list[float] | None:
    path = out / f"scitldr-{precision}" / "metrics.json"
    if not path.is_file():
        return None
    return [round(json.loads(path.read_text())["eval"]["validation"][SCITLDR_METRIC], 4)]


def verdict(fp32: list[float], bf16: list[float]) -> dict[str, Any]:
    """Means, sample standard deviations, and whether bf16's mean is within fp32's seed spread.

    "Within the spread": |mean(bf16) - mean(fp32)| <= the larger of the two standard deviations; with one
    seed (the generation run) there is no spread, so no verdict, only the difference.
    """
    row: dict[str, Any] = {"fp32_mean": statistics.mean(fp32), "bf16_mean": statistics.mean(bf16)}
    row["difference"] = row["bf16_mean"] - row["fp32_mean"]
    if len(fp32) > 1 and len(bf16) > 1:
        row["fp32_std"], row["bf16_std"] = statistics.stdev(fp32), statistics.stdev(bf16)
        row["within_seed_spread"] = abs(row["difference"]) <= max(row["fp32_std"], row["bf16_std"])
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


def collected(out: Path) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for task in GLUE_TASKS:
        values = {p: glue_values(out, task, p) for p in PRECISIONS}
        document[f"glue-{task}"] = {p: v for p, v in values.items() if v is not None}
    values = {p: scitldr_values(out, p) for p in PRECISIONS}
    document["summarization-scitldr-lora"] = {p: v for p, v in values.items() if v is not None}
    return document


def write_results(out: Path, path: Path) -> dict[str, Any]:
    results = collected(out)
    summary = {name: verdict(v["fp32"], v["bf16"]) for name, v in results.items() if len(v) == 2}
    document = {**results, "_summary": summary, "_metric": {
        "glue-cola": "matthews_correlation", "glue-stsb": "pearson", "glue-mrpc": "f1",
        "summarization-scitldr-lora": f"{SCITLDR_METRIC} (x100), subset: " + " ".join(SCITLDR),
    }, "_machine": machine_info(), "_command": f"python benchmarks/precision.py --out {out}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/precision"), help="run folders (resumable)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/precision.json"))
    parser.add_argument("--only", choices=("glue", "scitldr"), help="run only this part")
    opts = parser.parse_args()
    commands = []
    if opts.only != "scitldr":
        commands += [glue_command(task, p, opts.out) for task in GLUE_TASKS for p in PRECISIONS]
    if opts.only != "glue":
        commands += [("scitldr", p) for p in PRECISIONS]
    for command in commands:
        if isinstance(command, tuple):
            if scitldr_values(opts.out, command[1]) is not None:
                continue
            command = scitldr_command(command[1], opts.out)
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=False)
        print(json.dumps(write_results(opts.out, opts.json)["_summary"], indent=2), flush=True)
    write_results(opts.out, opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
