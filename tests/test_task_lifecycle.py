"""Task hooks take what they work on and return their result: each can be called alone, in any order.

On f358a87, GlueTask.load_model failed unless load_raw_datasets had run (it learned the head there) and
GenerationTask.load_model failed unless load_tokenizer had run (it learned the model kind there).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from conftest import SAMPLES
from transformers import EvalPrediction

from finetune import modeling
from finetune.config import parse_run_config
from finetune.generation import ModelKind
from finetune.pipeline import build_task

XSUM = SAMPLES / "xsum_sample" / "sample.jsonl"


def glue_task(model: Path, *argv: str):
    return build_task(parse_run_config(None, ["--model_name_or_path", str(model), "--report_to", "none", *argv]))


def test_glue_model_before_the_data(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("bert")
    alone = glue_task(model_dir, "--task_name", "mrpc")
    model = alone.load_model(modeling.load_tokenizer(alone.config.model))  # first hook called
    usual = glue_task(model_dir, "--task_name", "mrpc")
    raw = usual.load_raw_datasets()
    expected = usual.load_model(usual.load_tokenizer())
    assert model.config.id2label == expected.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    # tokenizing after the model: the labels are the ones the head was built for
    tokenized = alone.tokenize(raw, alone.load_tokenizer())
    assert sorted(set(tokenized["train"]["labels"])) == [0, 1]


def test_glue_custom_labels_metrics_and_records_alone(tiny_model_dir, tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    with train.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows([(f"review {i}", stars) for i, stars in enumerate([5, 1, 3, 5, 2, 4, 1, 3])])
    argv = ("--train_file", str(train), "--validation_file", str(train))
    task = glue_task(tiny_model_dir("bert"), *argv)
    metrics = task.compute_metrics(EvalPrediction(predictions=np.eye(5)[[4, 0]], label_ids=np.array([4, 1])))
    assert metrics["accuracy"] == 0.5 and metrics["examples"] == 2
    model = glue_task(tiny_model_dir("bert"), *argv).load_model(modeling.load_tokenizer(task.config.model))
    assert model.config.num_labels == 5 and list(model.config.id2label.values()) == ["1", "2", "3", "4", "5"]


def generation_task(model: Path):
    return build_task(parse_run_config(None, [
        "--task", "summarization", "--model_name_or_path", str(model), "--train_file", str(XSUM),
        "--validation_split_percentage", "30", "--max_seq_length", "64", "--max_target_length", "16",
        "--report_to", "none",
    ]))


def test_generation_model_before_the_tokenizer(tiny_model_dir) -> None:
    for arch, kind in (("t5", ModelKind.ENCODER_DECODER), ("llama", ModelKind.DECODER_ONLY)):
        task = generation_task(tiny_model_dir(arch))
        assert task.kind is kind  # from the checkpoint's config, before any hook
        tokenizer = modeling.load_tokenizer(task.config.model)
        model = task.load_model(tokenizer)  # without task.load_tokenizer()
        assert model.generation_config.max_new_tokens == task.config.generation.max_new_tokens
        if kind is ModelKind.DECODER_ONLY:
            assert model.generation_config.eos_token_id == tokenizer.eos_token_id
            assert task.load_tokenizer().padding_side == "right"
        # tokenizing before the raw data was loaded by this task, then decoding without load_tokenizer
        raw = generation_task(tiny_model_dir(arch)).load_raw_datasets()
        fresh = generation_task(tiny_model_dir(arch))
        tokenized = fresh.tokenize(raw, modeling.load_tokenizer(fresh.config.model))
        assert len(tokenized["train"]) == len(raw["train"])
        assert fresh.decode(np.array([tokenizer("a short text")["input_ids"]]))[0].startswith("a short")
