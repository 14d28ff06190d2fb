"""Quality check with the real pretrained MiniLM from the mirror (not a tiny random model)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from conftest import read_json, read_jsonl

from finetune.cli import main


def test_minilm_beats_majority_class_on_mrpc(tmp_path: Path) -> None:
    out = tmp_path / "minilm-mrpc"
    code = main([
        "train", "glue-mrpc", "--output_dir", str(out),
        "--max_train_samples", "800", "--max_eval_samples", "200",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--learning_rate", "1e-4",
        "--save_strategy", "no", "--load_best_model_at_end", "false",
    ])
    assert code == 0
    validation = read_json(out / "metrics.json")["eval"]["validation"]
    labels = [row["label"] for row in read_jsonl(out / "predictions_validation.jsonl")]
    assert len(labels) == validation["examples"] == 200
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    assert validation["accuracy"] > majority + 0.02, (validation, majority)
