"""Early stopping and class-weighted loss on tiny random-weight models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import read_json
from safetensors.torch import load_file

from finetune.cli import main


def train_tiny(model_dir: Path, out: Path, *extra: str, task_name: str = "mrpc") -> int:
    return main([
        "train", f"glue-{task_name}",
        "--model_name_or_path", str(model_dir),
        "--output_dir", str(out),
        "--max_train_samples", "32", "--max_eval_samples", "24",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "24",
        "--learning_rate", "1e-3", "--logging_steps", "1",
        *extra,
    ])


# ---------------------------------------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_stops_when_the_metric_cannot_improve(patience: int, tiny_model_dir, tmp_path: Path) -> None:
    # Learning rate 0: the weights never change, so every evaluation scores the same and none is an improvement.
    out = tmp_path / "run"
    code = train_tiny(
        tiny_model_dir("bert"), out,
        "--num_train_epochs", "6", "--learning_rate", "0", "--early_stopping_patience", str(patience),
    )
    assert code == 0
    state = read_json(out / "trainer_state.json")
    evaluations = [entry for entry in state["log_history"] if "eval_f1" in entry]
    # the first evaluation sets the best metric; then `patience` evaluations without improvement stop the run
    assert [e["epoch"] for e in evaluations] == [float(epoch) for epoch in range(1, patience + 2)]
    assert state["global_step"] == 4 * (patience + 1)  # 32 examples at batch 8: 4 steps per epoch
    assert read_json(out / "metrics.json")["train"]["epoch"] == patience + 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--load_best_model_at_end", "false"], "early_stopping_patience needs load_best_model_at_end true"),
        (["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"],
         "early_stopping_patience needs evaluations during training"),
        (["--early_stopping_patience", "0"], "--early_stopping_patience 0: must be an integer >= 1"),
    ],
)
def test_early_stopping_settings_are_checked(flags, message, tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train_tiny(tiny_model_dir("bert"), out, "--early_stopping_patience", "1", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("finetune: error: ") and message in err[-1]
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------------------
# Class weights
# ---------------------------------------------------------------------------------------------------------


def tiny_glue_trainer(model_dir: Path, out: Path, **settings):
    """A GLUE MRPC task and its Trainer, built by the pipeline's own steps, without training."""
    from finetune.callbacks import default_callbacks
    from finetune.config import parse_run_config
    from finetune.pipeline import build_task, eval_dataset_arg, tokenized_splits

    overrides = {"model_name_or_path": str(model_dir), "task_name": "mrpc", "output_dir": str(out),
                 "max_train_samples": 64, "max_eval_samples": 8, **settings}
    config = parse_run_config("glue-mrpc", overrides=overrides)
    task = build_task(config)
    _, tokenized, tokenizer = tokenized_splits(task, config)
    model = task.load_model(tokenizer)
    trainer = task.build_trainer(
        model, tokenizer, tokenized["train"], eval_dataset_arg(tokenized, ["validation"]), default_callbacks(config)
    )
    return config, tokenized, trainer


def test_weighted_loss_is_torch_weighted_cross_entropy(tiny_model_dir, tmp_path: Path) -> None:
    config, tokenized, trainer = tiny_glue_trainer(tiny_model_dir("bert"), tmp_path / "run", class_weights="auto")
    labels = np.asarray(tokenized["train"]["labels"])
    counts = np.bincount(labels, minlength=2)
    expected_weights = len(labels) / (2 * counts)  # inverse frequency, mean weight per example 1
    assert counts[0] != counts[1]  # MRPC is imbalanced, so the weights are not all 1
    assert torch.allclose(trainer.class_weights, torch.tensor(expected_weights, dtype=torch.float32))
    assert [float(w) for w in config.training.class_weights.split(",")] == pytest.approx(expected_weights, rel=1e-5)

    batch = trainer.data_collator([tokenized["train"][i] for i in range(12)])
    model = trainer.model.eval()  # no dropout: both losses see the same logits
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
    reference = F.cross_entropy(logits, batch["labels"], weight=torch.tensor(expected_weights, dtype=torch.float32))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-3)

    # Under gradient accumulation the Trainer divides each micro-batch's weighted mean by the number of
    # micro-batches, as it does for the model's own (unweighted) loss, even when it passes num_items_in_batch.
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    torch.manual_seed(0)
    step_loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=torch.tensor(24))
    torch.manual_seed(0)
    with torch.no_grad():
        mean_loss = trainer.compute_loss(trainer.model, dict(batch))
    assert step_loss.item() == pytest.approx(mean_loss.item() / 2, rel=1e-5)


def test_class_weights_recorded_and_equal_weights_match_plain_loss(tiny_model_dir, tmp_path: Path, capsys) -> None:
    source = tiny_model_dir("bert")
    assert train_tiny(source, tmp_path / "plain") == 0
    assert train_tiny(source, tmp_path / "ones", "--class_weights", "1,1") == 0
    assert train_tiny(source, tmp_path / "auto", "--class_weights", "auto") == 0

    def losses(run: str) -> list[float]:
        history = read_json(tmp_path / run / "trainer_state.json")["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    def head(run: str) -> torch.Tensor:
        return load_file(str(tmp_path / run / "model.safetensors"))["classifier.weight"]

    assert losses("ones") == pytest.approx(losses("plain"), rel=1e-5)  # weights 1 are the plain cross-entropy
    assert torch.allclose(head("ones"), head("plain"), atol=1e-6)
    # A random model predicts about 50/50, so the weighted loss values stay near ln 2; the gradients differ.
    assert (head("auto") - head("plain")).abs().max() > 1e-4
    saved = yaml.safe_load((tmp_path / "auto" / "finetune_config.yaml").read_text())["training"]["class_weights"]
    weights = [float(w) for w in saved.split(",")]
    assert len(weights) == 2 and weights[0] > 1 > weights[1]  # not_equivalent is the rarer MRPC label

    capsys.readouterr()
    assert main(["push", str(tmp_path / "auto"), "--dry_run", "--hub_model_id", "me/weighted"]) == 0
    assert f"| class_weights | {saved} |" in capsys.readouterr().out  # the card's hyperparameters table


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--class_weights", "1,2,3"], "class_weights has 3 weight(s) but the data has 2 labels"),
        (["--class_weights", "heavy"], "class_weights must be 'auto' or numbers"),
        (["--class_weights", "auto", "--task_name", "stsb"], "class_weights is for classification"),
    ],
)
def test_class_weights_errors(flags, message, tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train_tiny(tiny_model_dir("bert"), out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("finetune: error: ") and message in err[-1]
