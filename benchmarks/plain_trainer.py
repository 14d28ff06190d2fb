"""Arm (c) of ``benchmarks/throughput.py``: what a user who knows the Trainer writes, with nothing of finetune.

A plain ``transformers.Trainer`` on GLUE MRPC with the three settings that make it fast on its own:
dynamic padding (``DataCollatorWithPadding``), length-grouped batches
(``train_sampling_strategy="group_by_length"``) and fused AdamW (``optim="adamw_torch_fused"``), plus the
glue-mrpc recipe's optimization hyperparameters so that it trains the same thing. Runs on its own too:

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/plain_trainer.py --max_steps 230

The only thing it takes from the mirror is where the files are (a Hub id works the same online).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def hub_path(repo_id: str, kind: str) -> str:
    """The mirror copy of a Hub id when FINETUNE_HUB_MIRROR names one, else the id itself."""
    root = os.environ.get("FINETUNE_HUB_MIRROR")
    local = Path(root or "", kind, repo_id)
    return str(local) if root and local.is_dir() else repo_id


def build_trainer(
    model_name: str = MODEL,
    train_samples: int | None = None,
    eval_samples: int | None = None,
    max_steps: int = -1,
    epochs: float = 5,
    output_dir: str = "runs/plain-trainer",
    callbacks: list | None = None,
    seed: int = 42,
    bf16: bool = False,
) -> Trainer:
    """A Trainer for MRPC; ``train_samples``/``eval_samples`` take the first rows of each split (None: all);
    ``max_steps`` (if > 0) overrides ``epochs``; ``bf16``: autocast, as a user who knows the CPU has bf16 units
    writes it (TrainingArguments wants ``use_cpu`` for bf16 without a GPU)."""
    tokenizer = AutoTokenizer.from_pretrained(hub_path(model_name, "models"))
    raw = datasets.load_dataset(hub_path("nyu-mll/glue", "datasets"), "mrpc")

    def tokenize(batch):
        return tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=128)

    def first(split: str, limit: int | None):
        rows = raw[split]
        return rows.select(range(min(limit, len(rows)))) if limit is not None else rows

    columns = ["sentence1", "sentence2", "idx"]
    train = first("train", train_samples).map(tokenize, batched=True, remove_columns=columns)
    validation = first("validation", eval_samples).map(tokenize, batched=True, remove_columns=columns)
    model = AutoModelForSequenceClassification.from_pretrained(hub_path(model_name, "models"), num_labels=2)
    glue = evaluate.load(hub_path("evaluate-metric/glue", "spaces"), "mrpc")

    def compute_metrics(prediction):
        return glue.compute(predictions=np.argmax(prediction.predictions, axis=-1), references=prediction.label_ids)

    args = TrainingArguments(
        output_dir=output_dir,
        learning_rate=1e-4,
        per_device_train_batch_size=16,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=0.1,
        weight_decay=0.01,
        seed=seed,
        train_sampling_strategy="group_by_length",
        optim="adamw_torch_fused",
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=-1, help="optimizer steps (-1: 5 epochs)")
    parser.add_argument("--output_dir", default="runs/plain-trainer")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (also on a CPU)")
    opts = parser.parse_args()
    trainer = build_trainer(max_steps=opts.max_steps, output_dir=opts.output_dir, bf16=opts.bf16)
    trainer.train()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
