"""The training loss is one token-weighted mean over the whole optimizer step, whatever the batch is cut into.

(per-device batch b, gradient accumulation k) and (batch k*b, accumulation 1) see the same k*b examples in
their first optimizer step, so they must log the same loss and take the same step; so must 2 processes at
batch b against 1 process at batch 2b. Encoder-decoder models compute a per-batch mean that ignores the
Trainer's ``num_items_in_batch`` while their forward takes ``**kwargs``: unless finetune computes the loss
from the logits, transformers 5 takes that mean for a share of the step and logs (and steps) k x N too much.

Plain SGD without clipping, so the weights move by exactly lr x gradient (Adam's first step is
sign(gradient) and would hide any scaling); dropout is off so that the two runs draw the same masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, read_json
from safetensors.torch import load_file
from test_distributed import accelerate_launch

from finetune.cli import main

WMT = SAMPLES / "wmt16_en_ro_sample"  # 11 training pairs of very different lengths
TRANSLATION = ["--task", "translation", "--train_file", str(WMT / "train.jsonl"), "--source_lang", "en",
               "--target_lang", "ro", "--max_target_length", "32"]
CLASSIFICATION = ["glue-mrpc", "--max_train_samples", "16", "--max_eval_samples", "8"]
ONE_STEP = [
    "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5", "--max_grad_norm", "1e9", "--warmup_steps", "0",
    "--weight_decay", "0", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
    "--max_seq_length", "48", "--report_to", "none", "--disable_tqdm", "true",
    "--seed", "7",
]


def without_dropout(source: Path, target: Path) -> Path:
    """A copy of a checkpoint folder with every dropout probability set to 0."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    for key, value in config.items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            config[key] = 0.0
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """arch -> a copy of the tiny checkpoint without dropout."""
    made: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in made:
            source = tiny_model_dir("bert" if arch == "bert2bert" else arch)
            made[arch] = without_dropout(source, tmp_path_factory.mktemp(f"no-dropout-{arch}"))
        return made[arch]

    return build


def first_step(run: Path) -> dict[str, float]:
    logged = [entry for entry in read_json(run / "trainer_state.json")["log_history"] if "loss" in entry]
    assert logged and logged[0]["step"] == 1
    return logged[0]


def step_taken(source: Path, run: Path) -> dict[str, torch.Tensor]:
    """Weight change of every tensor the checkpoint and the run share (bert2bert: the encoder)."""
    old, new = load_file(str(source / "model.safetensors")), load_file(str(run / "model.safetensors"))
    if not set(old) & set(new):  # bert2bert saves the BERT weights under encoder.*
        old = {f"encoder.{k.split('.', 1)[1]}": v for k, v in old.items() if k.startswith("bert.")}
    return {k: new[k] - old[k] for k in new if k in old and old[k].shape == new[k].shape}


def assert_same_step(source: Path, one: Path, other: Path) -> None:
    first, second = first_step(one), first_step(other)
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-4)
    assert second["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)
    a, b = step_taken(source, one), step_taken(source, other)
    assert len(a) > 5 and set(a) == set(b)
    largest = max(d.abs().max().item() for d in a.values())
    assert largest > 1e-3  # the step moved the weights
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    assert difference <= 1e-4 * largest, f"steps differ by {difference:.3g} (largest change {largest:.3g})"


KINDS = {
    "t5": ["t5"], "bart": ["bart"], "marian": ["marian"], "mbart": ["mbart"], "bert2bert": ["bert2bert"],
    "gpt2": ["gpt2"], "llama": ["llama"],
    "t5-label-smoothing": ["t5", "--label_smoothing_factor", "0.1"],  # the Trainer's LabelSmoother path
    "llama-padding-free": ["llama", "--padding_free", "true", "--use_cache", "false"],  # one flattened row
    "bert-classification": ["bert"],  # a per-example mean: the Trainer divides it by the accumulation steps
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(kind, no_dropout_model, tmp_path: Path):
    arch, *extra = KINDS[kind]
    source = no_dropout_model(arch)
    data = CLASSIFICATION if kind.endswith("classification") else TRANSLATION
    runs = {}
    for batch, accumulation in ((2, 4), (8, 1)):
        runs[accumulation] = tmp_path / f"b{batch}-k{accumulation}"
        assert main([
            "train", *data, "--model_name_or_path", str(source), "--output_dir", str(runs[accumulation]), *ONE_STEP,
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation), *extra,
        ]) == 0
    assert_same_step(source, runs[1], runs[4])


@pytest.mark.distributed
@pytest.mark.parametrize("arch", [
    "t5",
    "llama",  # a decoder: its chunked loss, which runs the head outside DDP's forward, is off on 2 processes
])
def test_two_processes_take_the_same_step_as_one(arch, no_dropout_model, tmp_path: Path) -> None:
    source = no_dropout_model(arch)
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*TRANSLATION, "--model_name_or_path", str(source), *ONE_STEP, "--gradient_accumulation_steps", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--output_dir", str(one), *common, "--per_device_train_batch_size", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    accelerate_launch(["train", "--output_dir", str(two), *common, "--per_device_train_batch_size", "2"],
                      tmp_path / "datasets-cache")
    assert_same_step(source, one, two)
