"""Evaluation speed of a classifier by batch size, rows in dataset order vs longest first.

finetune evaluates classification splits longest rows first (``Task.predict``; predictions come back in
row order), so each batch pads to a length close to its own rows'. This measures what that and the batch
size give on the MRPC validation split (408 rows), each setting ``--repeats`` times, alternating:

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/eval_batching.py --batches 8,64,256 --repeats 3

Not a test: it asserts nothing. Prints a Markdown table; ``--json`` writes every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from finetune.batching import longest_first
from finetune.config import parse_run_config
from finetune.pipeline import build_task, tokenized_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="glue-mrpc")
    parser.add_argument("--batches", default="8,64,256", help="evaluation batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/eval_batching.json")
    opts = parser.parse_args()
    config = parse_run_config(opts.recipe, overrides={"output_dir": "/tmp/eval-batching", "report_to": "none",
                                                       "disable_tqdm": True})
    task = build_task(config)
    _, tokenized, tokenizer = tokenized_splits(task, config)
    model = task.load_model(tokenizer).eval()
    collate = task.data_collator(tokenizer, model)
    validation = tokenized["validation"].remove_columns(["labels"])
    orders = {"dataset order": validation, "longest first": longest_first(validation)}
    timings: dict[str, list[float]] = {}
    padding: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    for _ in range(opts.repeats):
        for batch in [int(b) for b in opts.batches.split(",")]:
            for name, rows in orders.items():
                key = f"{name}, batch {batch}"
                real = padded = 0
                start = time.perf_counter()
                with torch.inference_mode():
                    for begin in range(0, len(rows), batch):
                        inputs = collate([rows[i] for i in range(begin, min(begin + batch, len(rows)))])
                        model(**inputs)
                        real += int(inputs["attention_mask"].sum())
                        padded += inputs["attention_mask"].numel()
                timings.setdefault(key, []).append(len(rows) / (time.perf_counter() - start))
                padding[key] = 1 - real / padded
    print("| rows | batch | eval samples/s (median) | padding |")
    print("|---|---|---|---|")
    for key, values in timings.items():
        name, batch = key.split(", batch ")
        print(f"| {name} | {batch} | {statistics.median(values):.1f} | {padding[key]:.1%} |")
    print(f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    report = {"recipe": opts.recipe, "rows": len(validation), "samples_per_s": timings, "padding": padding,
              "load_average": [load_before, os.getloadavg()[0]], "threads": torch.get_num_threads()}
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
