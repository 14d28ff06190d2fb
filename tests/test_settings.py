"""Settings are final once parsed: derived values go into TrainingArguments' constructor, not after it.

TrainingArguments.__post_init__ fixes what depends on other fields (the mixed-precision mode the Trainer's
accelerator uses, from bf16; greater_is_better, from the metric). A field edited afterwards is out of step
with it: a GPU run whose config and card said bf16 trained in fp32 (issue 11.5).
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import GLUE, SAMPLES
from transformers import training_args

from finetune import config as config_module
from finetune import pipeline, precision
from finetune.config import parse_run_config

XSUM = SAMPLES / "xsum_sample" / "sample.jsonl"
TINY = ["--max_train_samples", "8", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--max_steps", "1", "--report_to", "none", "--disable_tqdm", "true"]


def family_argv(family: str, model: Path, out: Path) -> list[str]:
    if family == "glue":
        return ["--task_name", "mrpc", "--model_name_or_path", str(model), "--output_dir", str(out), *TINY]
    return ["--task", "summarization", "--model_name_or_path", str(model), "--output_dir", str(out),
            "--train_file", str(XSUM), "--validation_split_percentage", "30", "--max_seq_length", "64",
            "--max_target_length", "16", "--max_new_tokens", "4", *TINY]


def saved(out: Path) -> dict:
    return yaml.safe_load((out / "finetune_config.yaml").read_text())


def test_derived_settings_are_decided_at_parse_time(tmp_path: Path) -> None:
    cola = parse_run_config("glue-cola")
    assert cola.training.output_dir == str(Path("runs") / "glue-cola")
    assert (cola.training.metric_for_best_model, cola.training.greater_is_better) == ("matthews_correlation", True)
    assert parse_run_config(None, ["--task", "summarization"]).training.metric_for_best_model == "rougeL"
    assert parse_run_config(None, ["--task", "translation"]).training.metric_for_best_model == "sacrebleu"
    (tmp_path / "x.csv").write_text("sentence,label\ngood,1\n")  # data files must exist (finetune.validation)
    custom = parse_run_config(None, ["--train_file", str(tmp_path / "x.csv")])
    assert (custom.training.metric_for_best_model, custom.training.output_dir) == ("accuracy", str(Path("runs/glue")))
    # what the user sets stays, and TrainingArguments derives the rest from it
    loss = parse_run_config("glue-cola", ["--metric_for_best_model", "loss", "--output_dir", "here"])
    assert (loss.training.metric_for_best_model, loss.training.greater_is_better) == ("loss", False)
    assert loss.training.output_dir == "here"
    assert parse_run_config("glue-cola", []).training.dataloader_pin_memory is torch.cuda.is_available()


@pytest.mark.parametrize("family, arch", [("glue", "bert"), ("summarization", "t5"), ("summarization", "llama")])
def test_bf16_flag_reaches_the_accelerator(family: str, arch: str, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Without a GPU, TrainingArguments accept bf16 only with use_cpu (CPU autocast): finetune sets it (issue 23).
    config = parse_run_config(None, [*family_argv(family, tiny_model_dir(arch), out), "--bf16", "true"])
    trainer = pipeline.prepare_training(config).trainer
    assert trainer.args.bf16 and trainer.args.mixed_precision == "bf16"
    assert trainer.accelerator.mixed_precision == "bf16"
    assert saved(out)["training"]["bf16"] is True
    assert saved(out)["training"]["use_cpu"] is (not torch.cuda.is_available())


def test_gpu_defaults_reach_the_arguments_the_config_file_and_the_accelerator(
    tiny_model_dir, tmp_path: Path, monkeypatch
) -> None:
    """A GPU with bf16 (mocked): bf16 and two workers, chosen before TrainingArguments are built."""
    # The GPU is mocked where finetune looks for one. Mocked for transformers as well, TrainingArguments
    # would move to cuda:0; it runs on the CPU instead, where it accepts bf16 with use_cpu (CPU autocast),
    # so the Trainer and its accelerator can be built here.
    gpu = SimpleNamespace(is_available=lambda: True, is_bf16_supported=lambda *a, **k: True,
                          get_device_name=lambda *a: "NVIDIA H200")
    monkeypatch.setattr(config_module, "torch", SimpleNamespace(cuda=gpu))
    monkeypatch.setattr(precision, "torch", SimpleNamespace(cuda=gpu))
    # TrainingArguments (transformers) must believe in the GPU's bf16 too; the accelerator still runs on the CPU.
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    out = tmp_path / "run"
    config = parse_run_config(None, family_argv("glue", tiny_model_dir("bert"), out))
    args = config.training
    assert args.bf16 and args.mixed_precision == "bf16" and args.dataloader_num_workers == 2
    assert not args.use_cpu and config.precision.startswith("bf16 autocast: NVIDIA H200 computes bf16")
    trainer = pipeline.prepare_training(config).trainer
    assert trainer.args.mixed_precision == "bf16" and trainer.accelerator.mixed_precision == "bf16"
    assert saved(out)["training"]["bf16"] is True and saved(out)["training"]["dataloader_num_workers"] == 2
    # set by the user (or by an accelerate config): left alone
    assert not parse_run_config(None, ["--bf16", "false"]).training.bf16
    workers = parse_run_config(None, ["--dataloader_num_workers", "0"]).training
    assert workers.dataloader_num_workers == 0
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert not parse_run_config(None, []).training.bf16


def write_csv(path: Path, rows: list[tuple[str, float]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def test_the_pipeline_never_edits_the_parsed_arguments(tiny_model_dir, tmp_path: Path) -> None:
    """What only the data decides (scores in the label column: regression; no validation file: no evaluation)
    comes as new arguments; the parsed ones stay as parsed."""
    sentences = [f"sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(16)]
    train = write_csv(tmp_path / "train.csv", [(s, i / 4) for i, s in enumerate(sentences)])
    dev = write_csv(tmp_path / "dev.csv", [(s, i / 3) for i, s in enumerate(sentences[:8])])
    common = ["--model_name_or_path", str(tiny_model_dir("bert")), "--train_file", str(train), *TINY[4:]]
    common[common.index("--max_steps") + 1] = "2"

    config = parse_run_config(None, [*common, "--validation_file", str(dev), "--output_dir", str(tmp_path / "r")])
    parsed_args = config.training
    before = parsed_args.to_dict()
    metrics = pipeline.train(config)
    assert parsed_args.to_dict() == before and parsed_args.metric_for_best_model == "accuracy"
    assert config.training is not parsed_args  # new arguments, built with the regression metric
    assert (config.training.metric_for_best_model, config.training.greater_is_better) == ("pearson", True)
    assert saved(tmp_path / "r")["training"]["metric_for_best_model"] == "pearson"
    assert set(metrics["eval"]["validation"]) >= {"pearson", "spearmanr"}

    config = parse_run_config(None, [*common, "--output_dir", str(tmp_path / "n")])
    parsed_args, before = config.training, config.training.to_dict()
    pipeline.train(config)
    assert parsed_args.to_dict() == before
    assert (saved(tmp_path / "n")["training"]["eval_strategy"], config.training.load_best_model_at_end) == ("no", False)


def test_inference_builds_its_own_arguments(tiny_model_dir, tmp_path: Path) -> None:
    config = parse_run_config("glue-mrpc", ["--model_name_or_path", str(tiny_model_dir("bert")),
                                            "--output_dir", str(tmp_path), "--max_eval_samples", "4"])
    parsed_args, before = config.training, config.training.to_dict()
    _, trainer, _, _ = pipeline.load_for_inference(config)
    assert parsed_args.to_dict() == before and parsed_args.eval_strategy == "epoch"
    assert trainer.args.eval_strategy == "no" and not trainer.args.load_best_model_at_end
    assert GLUE.is_dir()
