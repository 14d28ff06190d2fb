"""`finetune train` on GLUE subsets with tiny random-weight models of every classification architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DECODERS, ENCODERS, read_json, read_jsonl
from safetensors.torch import load_file

from finetune.cli import main


def body_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a saved checkpoint, keyed without the task-head prefix so that both ends compare."""
    tensors = load_file(str(path / "model.safetensors"))
    return {k.split(".", 1)[1] if "." in k else k: v for k, v in tensors.items()}


def train_tiny(model_dir: Path, out: Path, task_name: str = "mrpc", *extra: str) -> int:
    return main([
        "train", f"glue-{task_name}",
        "--model_name_or_path", str(model_dir),
        "--output_dir", str(out),
        "--max_train_samples", "48", "--max_eval_samples", "40",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3", "--logging_steps", "2",
        *extra,
    ])


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_tiny_model_trains_on_mrpc(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir(arch)
    out = tmp_path / "run"
    assert train_tiny(source, out) == 0

    for name in ("config.json", "model.safetensors", "finetune_config.yaml", "metrics.json",
                 "predictions_validation.jsonl", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert any((out / n).is_file() for n in ("tokenizer.json", "vocab.txt")), "tokenizer not saved"

    metrics = read_json(out / "metrics.json")
    validation = metrics["eval"]["validation"]
    assert validation["examples"] == 40
    assert 0.0 <= validation["accuracy"] <= 1.0 and 0.0 <= validation["f1"] <= 1.0
    assert metrics["train"]["train_loss"] > 0

    before, after = body_weights(source), body_weights(out)
    shared = [k for k in after if k in before and before[k].shape == after[k].shape]
    assert len(shared) > 5
    changed = [k for k in shared if not torch.equal(before[k], after[k])]
    assert len(changed) > len(shared) // 2, f"only {len(changed)}/{len(shared)} tensors changed"

    config = read_json(out / "config.json")
    assert config["id2label"] == {"0": "not_equivalent", "1": "equivalent"}
    assert config["pad_token_id"] is not None
    predictions = read_jsonl(out / "predictions_validation.jsonl")
    assert len(predictions) == 40
    assert {p["prediction"] for p in predictions} <= {"not_equivalent", "equivalent"}
    assert {p["label"] for p in predictions} <= {"not_equivalent", "equivalent"}


def test_regression_task_stsb(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "stsb"
    assert train_tiny(tiny_model_dir("bert"), out, "stsb") == 0
    validation = read_json(out / "metrics.json")["eval"]["validation"]
    assert set(validation) >= {"pearson", "spearmanr", "combined_score"}
    assert -1.0 <= validation["pearson"] <= 1.0
    config = read_json(out / "config.json")
    assert len(config["id2label"]) == 1 and config["problem_type"] == "regression"
    assert isinstance(read_jsonl(out / "predictions_validation.jsonl")[0]["prediction"], float)


def test_single_sentence_task_cola_and_evaluate_predict(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cola"
    assert train_tiny(tiny_model_dir("bert"), out, "cola") == 0
    validation = read_json(out / "metrics.json")["eval"]["validation"]
    assert -1.0 <= validation["matthews_correlation"] <= 1.0

    # evaluate the run directory: same model, same split -> the same metric as at the end of training
    assert main(["evaluate", str(out), "--max_eval_samples", "40"]) == 0
    evaluated = read_json(out / "eval_results.json")["validation"]
    assert evaluated["matthews_correlation"] == pytest.approx(validation["matthews_correlation"], abs=1e-6)
    assert "matthews_correlation" in capsys.readouterr().out

    assert main(["predict", str(out), "--max_predict_samples", "25"]) == 0
    rows = read_jsonl(out / "predictions_test.jsonl")
    assert len(rows) == 25
    assert {r["prediction"] for r in rows} <= {"unacceptable", "acceptable"}
    assert all("label" not in r for r in rows)  # GLUE test labels are hidden (-1)
