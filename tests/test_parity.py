"""Parity with a plain Trainer: `finetune train` keeps the training semantics of run_glue.py / run_summarization.py.

With finetune's speed features off (pad to max length, random sampler, plain AdamW), `finetune train`
must log the same per-step losses as a short plain-`Trainer` script on the same data, seed and
hyperparameters: whatever finetune adds (label handling, callbacks, its Trainer subclasses, the loss
corrections for accumulation and several processes) leaves single-process training as transformers does
it. Both sides call ``set_seed(seed)`` before loading the model, so the new head is drawn from the same
RNG state, and the Trainer reseeds before shuffling. With the features on (length-bucketed batches,
dynamic padding, fused AdamW) the numbers change, but the final metric must stay close.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import read_json

from finetune.cli import main

SEED = 7
MAX_LENGTH = 32
HYPER = {"learning_rate": 5e-3, "num_train_epochs": 8, "per_device_train_batch_size": 8, "warmup_steps": 0.1,
         "weight_decay": 0.01}
#: the final validation accuracy with the speed features on may differ from the plain Trainer's by this much
ACCURACY_TOLERANCE = 0.1
#: per-step losses: the same computation in the same order, up to float reassociation
LOSS_TOLERANCE = 1e-5

FILLER = ("the", "room", "was", "and", "staff", "we", "stayed", "two", "nights", "near", "station", "breakfast")


def review_rows(count: int, rng: random.Random) -> list[dict[str, str | int]]:
    """Reviews of varied length whose star rating (1 or 5) one keyword gives away: learnable by a tiny model.

    Integer labels that are not 0..n-1 take finetune's label mapping; the plain script maps them as
    run_glue.py does (a sorted label list).
    """
    rows = []
    for i in range(count):
        stars = 5 if i % 2 else 1
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 10))]
        words.insert(rng.randrange(len(words) + 1), "wonderful" if stars == 5 else "terrible")
        rows.append({"text": " ".join(words), "label": stars})
    return rows


def write_csv(path: Path, rows: list[dict[str, str | int]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def review_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("reviews")
    return (write_csv(folder / "train.csv", review_rows(64, rng)),
            write_csv(folder / "dev.csv", review_rows(32, rng)))


def plain_trainer_run(model_dir: Path, train_file: Path, dev_file: Path, out: Path) -> tuple[list[float], float]:
    """What a run_glue.py user writes: (per-step training losses, final validation accuracy)."""
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(SEED)  # before the model: the new classification head is drawn from this seed
    raw = datasets.load_dataset("csv", data_files={"train": str(train_file), "validation": str(dev_file)})
    names = sorted(set(raw["train"]["label"]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=MAX_LENGTH, padding="max_length")
        encoded["labels"] = [names.index(label) for label in batch["label"]]
        return encoded

    tokenized = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    args = TrainingArguments(
        output_dir=str(out), seed=SEED, optim="adamw_torch", train_sampling_strategy="random",
        logging_steps=1, eval_strategy="epoch", save_strategy="no", per_device_eval_batch_size=64,
        dataloader_pin_memory=False, report_to="none", **HYPER,
    )

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=accuracy,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer.evaluate()["eval_accuracy"]


def finetune_run(
    model_dir: Path, train_file: Path, dev_file: Path, out: Path, *extra: str
) -> tuple[list[float], float]:
    """(per-step training losses, final validation accuracy) of `finetune train`."""
    hyper = [item for key, value in HYPER.items() for item in (f"--{key}", str(value))]
    assert main([
        "train", "--model_name_or_path", str(model_dir), "--train_file", str(train_file),
        "--validation_file", str(dev_file), "--text_column", "text", "--output_dir", str(out), "--seed", str(SEED),
        "--max_seq_length", str(MAX_LENGTH), "--logging_steps", "1", "--save_strategy", "no",
        "--load_best_model_at_end", "false", *hyper, *extra,
    ]) == 0
    history = read_json(out / "trainer_state.json")["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses, read_json(out / "metrics.json")["eval"]["validation"]["accuracy"]


def test_classification_matches_a_plain_trainer(tiny_model_dir, review_files, tmp_path: Path) -> None:
    model = tiny_model_dir("bert")
    plain_losses, plain_accuracy = plain_trainer_run(model, *review_files, tmp_path / "plain")
    assert len(plain_losses) == 8 * 64 // 8
    assert plain_accuracy >= 0.75, "the toy task must be learnable for the metric comparison to mean anything"

    speed_off = ["--pad_to_max_length", "true", "--train_sampling_strategy", "random", "--optim", "adamw_torch"]
    losses, accuracy = finetune_run(model, *review_files, tmp_path / "off", *speed_off)
    assert len(losses) == len(plain_losses)
    assert np.allclose(losses, plain_losses, rtol=0, atol=LOSS_TOLERANCE), list(zip(losses, plain_losses, strict=True))
    assert accuracy == pytest.approx(plain_accuracy, abs=1e-9)

    _, fast_accuracy = finetune_run(model, *review_files, tmp_path / "on")  # finetune's defaults
    assert abs(fast_accuracy - plain_accuracy) <= ACCURACY_TOLERANCE, (fast_accuracy, plain_accuracy)


def plain_seq2seq_losses(model_dir: Path, train_file: Path, dev_file: Path, out: Path) -> list[float]:
    """What a run_summarization.py user writes (dynamic padding, labels padded with -100): per-step losses."""
    import datasets
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    set_seed(SEED)
    raw = datasets.load_dataset("json", data_files={"train": str(train_file), "validation": str(dev_file)})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # the tiny tokenizer has none, like GPT-2's

    def encode(batch):
        encoded = tokenizer(batch["document"], max_length=96, truncation=True)
        encoded["labels"] = tokenizer(text_target=batch["summary"], max_length=24, truncation=True)["input_ids"]
        return encoded

    tokenized = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out), seed=SEED, optim="adamw_torch", train_sampling_strategy="random", logging_steps=1,
        eval_strategy="no", save_strategy="no", dataloader_pin_memory=False, report_to="none", **SEQ2SEQ_HYPER,
    )
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=tokenized["train"], processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


SEQ2SEQ_HYPER = {"learning_rate": 3e-3, "num_train_epochs": 3, "per_device_train_batch_size": 4, "warmup_steps": 0.1,
                 "weight_decay": 0.01}


def test_summarization_matches_a_plain_seq2seq_trainer(tiny_model_dir, tmp_path: Path) -> None:
    from conftest import SAMPLES

    lines = (SAMPLES / "xsum_sample" / "sample.jsonl").read_text().splitlines()
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("\n".join(lines[:7]) + "\n")
    dev.write_text("\n".join(lines[7:10]) + "\n")
    model = tiny_model_dir("t5")
    plain = plain_seq2seq_losses(model, train, dev, tmp_path / "plain")
    assert len(plain) == 3 * 2  # 7 examples in batches of 4, three epochs

    out = tmp_path / "finetune"
    hyper = [item for key, value in SEQ2SEQ_HYPER.items() for item in (f"--{key}", str(value))]
    assert main([
        "train", "--task", "summarization", "--model_name_or_path", str(model), "--train_file", str(train),
        "--validation_file", str(dev), "--output_dir", str(out), "--seed", str(SEED), "--max_seq_length", "96",
        "--max_target_length", "24", "--max_new_tokens", "4", "--logging_steps", "1", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "false", "--train_sampling_strategy", "random",
        "--optim", "adamw_torch", *hyper,
    ]) == 0
    losses = [entry["loss"] for entry in read_json(out / "trainer_state.json")["log_history"] if "loss" in entry]
    assert np.allclose(losses, plain, rtol=0, atol=LOSS_TOLERANCE), list(zip(losses, plain, strict=True))
