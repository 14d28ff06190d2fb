"""Metrics through evaluate: hand-computed values, `--metric` specs with options, mirror resolution, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import MIRROR, read_json
from finetune.tasks.glue import GlueTask
from sklearn.metrics import f1_score
from transformers import EvalPrediction

from finetune import metrics
from finetune.cli import main
from finetune.config import parse_run_config
from finetune.errors import FinetuneError
from finetune.metrics import LabelScorer, MetricSpec, parse_metrics, predicted_labels

PREDS = np.array([1, 1, 0, 0, 1])
LABELS = np.array([1, 0, 0, 1, 1])


def test_accuracy_and_f1_by_hand() -> None:
    # TP=2 FP=1 FN=1 -> precision 2/3, recall 2/3, F1 2/3; 3 of 5 correct
    result = LabelScorer(parse_metrics("f1,accuracy"))(PREDS, LABELS)
    assert result == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.6),
                      "combined_score": pytest.approx((2 / 3 + 0.6) / 2)}


def test_matthews_by_hand() -> None:
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert LabelScorer(parse_metrics("matthews_correlation"))(PREDS, LABELS) == {
        "matthews_correlation": pytest.approx(expected)
    }


def test_pearson_and_spearman_by_hand() -> None:
    preds = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    labels = np.array([1.0, 3.0, 2.0, 4.0], dtype=np.float32)
    # Pearson: both centred [-1.5,-.5,.5,1.5] vs [-1.5,.5,-.5,1.5]; cov 4 / var 5 -> 0.8
    # Spearman on ranks [1,2,3,4] vs [1,3,2,4]: 1 - 6*2/(4*15) = 0.8
    result = LabelScorer([MetricSpec("glue", config_name="stsb")])(preds, labels)
    assert result == {"pearson": pytest.approx(0.8), "spearmanr": pytest.approx(0.8),
                      "combined_score": pytest.approx(0.8)}


def test_predicted_labels() -> None:
    logits = np.array([[0.1, 2.0], [3.0, -1.0]])
    assert predicted_labels(logits, is_regression=False).tolist() == [1, 0]
    assert predicted_labels(np.array([[0.5], [2.5]]), is_regression=True).tolist() == [0.5, 2.5]
    assert predicted_labels((logits, np.zeros(2)), is_regression=False).tolist() == [1, 0]


@pytest.mark.parametrize(
    "task_name, expected_keys",
    [
        ("cola", {"matthews_correlation"}),
        ("sst2", {"accuracy"}),
        ("mrpc", {"f1", "accuracy", "combined_score"}),
        ("qqp", {"f1", "accuracy", "combined_score"}),
        ("stsb", {"pearson", "spearmanr", "combined_score"}),
        ("mnli", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("wnli", {"accuracy"}),
    ],
)
def test_each_glue_task_reports_its_official_metrics(task_name: str, expected_keys: set[str]) -> None:
    task = GlueTask(parse_run_config(None, ["--task_name", task_name]))
    regression = task_name == "stsb"
    logits = np.array([[0.3], [0.9], [0.1]]) if regression else np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0.2, 1.0, 0.0]) if regression else np.array([1, 0, 0])
    result = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert set(result) == expected_keys | {"examples"}
    assert result["examples"] == 3
    if "accuracy" in expected_keys:
        assert result["accuracy"] == pytest.approx(2 / 3)


def test_the_scorers_are_evaluate_modules_from_the_mirror() -> None:
    import evaluate

    task = GlueTask(parse_run_config(None, ["--task_name", "mrpc"]))
    task.load_metrics()
    (module,) = task.scorer.modules
    assert isinstance(module, evaluate.EvaluationModule)
    assert (module.name, module.config_name) == ("glue", "mrpc")
    assert metrics.module_id("glue") == "evaluate-metric/glue"
    assert metrics.module_id("me/my_metric") == "me/my_metric"
    # loaded once per task: later evaluations reuse the same module object
    task.compute_metrics(EvalPrediction(predictions=np.eye(2), label_ids=np.array([0, 1])))
    assert task.scorer.modules[0] is module


def test_metric_specs_with_options() -> None:
    specs = parse_metrics("f1:average=macro, accuracy,precision:average=weighted:zero_division=0")
    assert specs == (
        MetricSpec("f1", (("average", "macro"),)),
        MetricSpec("accuracy"),
        MetricSpec("precision", (("average", "weighted"), ("zero_division", 0))),
    )
    assert [s.label for s in specs] == ["f1", "accuracy", "precision"]
    twice = parse_metrics("f1:average=macro,f1:average=micro")
    assert [s.label for s in twice] == ["f1_macro", "f1_micro"]
    assert parse_metrics("glue:config_name=mrpc") == (MetricSpec("glue", config_name="mrpc"),)
    assert metrics.best_metric(parse_metrics("rouge,sacrebleu")) == "rougeL"
    for bad in ("", ",", "f1:macro", "f1,f1"):
        with pytest.raises(FinetuneError):
            parse_metrics(bad)


def test_custom_metrics_with_options_on_three_classes(tmp_path) -> None:
    (tmp_path / "x.csv").write_text("sentence,label\na,0\n")  # the config checks that the file exists
    flags = ["--train_file", str(tmp_path / "x.csv"), "--metric", "f1:average=macro,f1:average=micro,accuracy"]
    task = GlueTask(parse_run_config(None, flags))
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), labels] += 0.8
    preds = logits.argmax(-1)
    result = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert result["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-12)
    assert result["f1_micro"] == pytest.approx(f1_score(labels, preds, average="micro"), abs=1e-12)
    assert result["accuracy"] == pytest.approx((preds == labels).mean(), abs=1e-12)
    assert task.best_metric == "f1_macro"
    # binary-only F1 on three classes is refused before training, not at the first evaluation
    with pytest.raises(FinetuneError, match="needs an average: e.g. f1:average=macro"):
        metrics.require_averages(parse_metrics("f1"), 3)


def test_an_unknown_metric_is_one_line_naming_where_it_looked(monkeypatch) -> None:
    with pytest.raises(FinetuneError) as caught:
        LabelScorer(parse_metrics("no_such_metric"))
    message = str(caught.value)
    assert "\n" not in message
    assert str(MIRROR / "spaces" / "evaluate-metric" / "no_such_metric") in message
    assert "evaluate-metric/no_such_metric" in message


def test_train_with_custom_metrics(tiny_model_dir, tmp_path, capsys) -> None:
    """`--metric` end to end: the named metrics are computed each epoch, and the first picks the best model."""
    rows = [("good film", "pos"), ("bad film", "neg"), ("dull plot", "meh"), ("great cast", "pos")] * 8
    for split, part in (("train", rows), ("dev", rows[:12])):
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in part))
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny_model_dir("bert")), "--train_file",
                 str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"), "--text_column", "text",
                 "--metric", "f1:average=macro,accuracy", "--output_dir", str(out), "--num_train_epochs", "2",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"]) == 0
    validation = read_json(out / "metrics.json")["eval"]["validation"]
    assert set(validation) >= {"f1", "accuracy", "combined_score"}
    state = read_json(out / "trainer_state.json")
    assert [e for e in state["log_history"] if "eval_f1" in e and "eval_accuracy" in e]
    assert state["best_metric"] == max(e["eval_f1"] for e in state["log_history"] if "eval_f1" in e)

    # the same flag without an average on three classes: one line, exit code 2, nothing trained
    code = main(["train", "--model_name_or_path", str(tiny_model_dir("bert")), "--train_file",
                 str(tmp_path / "train.csv"), "--text_column", "text", "--metric", "f1",
                 "--output_dir", str(tmp_path / "refused")])
    assert code == 2
    assert "finetune: error: --metric f1 on 3 classes needs an average" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
