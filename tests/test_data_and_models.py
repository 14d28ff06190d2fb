"""Local data files, label handling, the mirror, GGUF conversion, packaging."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest
import torch
from conftest import MINILM, MIRROR, ROOT, read_json, read_jsonl
from safetensors.torch import load_file, save_file

from finetune import mirror
from finetune.cli import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError

SMOL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_args(out: Path, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "24",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        *extra,
    ]


@pytest.fixture(scope="module")
def mrpc_rows() -> datasets.Dataset:
    glue = datasets.load_dataset(str(MIRROR / "datasets" / "nyu-mll" / "glue"), "mrpc")
    rows = glue["train"].select(range(40))
    names = rows.features["label"].names
    return rows.map(
        lambda r: {"first": r["sentence1"], "second": r["sentence2"], "verdict": names[r["label"]]},
        remove_columns=rows.column_names,
    )


@pytest.mark.parametrize("suffix", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_files_with_custom_columns(suffix: str, mrpc_rows, tiny_model_dir, tmp_path: Path) -> None:
    files = {}
    for split, part in {"train": mrpc_rows.select(range(32)), "validation": mrpc_rows.select(range(32, 40))}.items():
        path = tmp_path / f"{split}.{suffix}"
        if suffix in ("csv", "tsv"):
            part.to_pandas().to_csv(path, sep="\t" if suffix == "tsv" else ",", index=False)
        elif suffix == "json":
            path.write_text(json.dumps(part.to_list()))
        elif suffix == "jsonl":
            part.to_json(path, lines=True)
        else:
            part.to_parquet(path)
        files[split] = path
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tiny_model_dir("bert")),
            "--train_file",
            str(files["train"]),
            "--validation_file",
            str(files["validation"]),
            "--text_column",
            "first",
            "--text_pair_column",
            "second",
            "--label_column",
            "verdict",
            *tiny_args(out),
        ]
    )
    assert code == 0
    config = read_json(out / "config.json")
    assert set(config["id2label"].values()) == {"equivalent", "not_equivalent"}
    predictions = read_jsonl(out / "predictions_validation.jsonl")
    assert len(predictions) == 8
    assert predictions[0]["label"] in {"equivalent", "not_equivalent"}
    assert read_json(out / "metrics.json")["eval"]["validation"]["examples"] == 8


def test_trained_head_is_remapped_by_label_name(tiny_model_dir, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), *tiny_args(run)]) == 0

    # The same classifier with its two labels stored in the opposite order: outputs map back by name.
    swapped = tmp_path / "swapped"
    shutil.copytree(run, swapped, ignore=shutil.ignore_patterns("checkpoint-*", "*.json*", "finetune_config.yaml"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run / name, swapped / name)
    config = read_json(run / "config.json")
    config["id2label"] = {"0": "equivalent", "1": "not_equivalent"}
    config["label2id"] = {"equivalent": 0, "not_equivalent": 1}
    (swapped / "config.json").write_text(json.dumps(config))
    weights = load_file(str(run / "model.safetensors"))
    for key in ("classifier.weight", "classifier.bias"):
        weights[key] = weights[key].flip(0).contiguous()
    save_file(weights, str(swapped / "model.safetensors"), metadata={"format": "pt"})

    for model in (run, swapped):
        assert (
            main(
                [
                    "evaluate",
                    str(model),
                    "--task_name",
                    "mrpc",
                    "--max_eval_samples",
                    "24",
                    "--output_dir",
                    str(tmp_path / f"eval-{model.name}"),
                ]
            )
            == 0
        )
    original = read_jsonl(tmp_path / "eval-run" / "predictions_validation.jsonl")
    remapped = read_jsonl(tmp_path / "eval-swapped" / "predictions_validation.jsonl")
    assert [r["prediction"] for r in original] == [r["prediction"] for r in remapped]
    scores = [read_json(tmp_path / f"eval-{name}" / "eval_results.json")["validation"] for name in ("run", "swapped")]
    for key in ("f1", "accuracy", "loss"):
        assert scores[0][key] == pytest.approx(scores[1][key], abs=1e-6), key


def test_head_with_other_labels_is_a_clear_error(tiny_model_dir, tmp_path: Path, capsys) -> None:
    run = tmp_path / "cola"
    assert main(["train", "glue-cola", "--model_name_or_path", str(tiny_model_dir("bert")), *tiny_args(run)]) == 0
    code = main(["train", "glue-mrpc", "--model_name_or_path", str(run), *tiny_args(tmp_path / "mrpc")])
    assert code == 2
    err = capsys.readouterr().err
    assert "classification head for labels ['unacceptable', 'acceptable']" in err


def test_mirror_resolves_ids_and_falls_through() -> None:
    assert mirror.resolve("sentence-transformers/all-MiniLM-L6-v2", "models") == str(MINILM)
    assert mirror.resolve("nyu-mll/glue", "datasets") == str(MIRROR / "datasets" / "nyu-mll" / "glue")
    assert mirror.resolve("someone/elsewhere", "models") == "someone/elsewhere"
    with pytest.raises(FinetuneError, match=r"cannot load model 'someone/elsewhere': tried mirror .*Hub"):
        mirror.load_or_explain(lambda path: (_ for _ in ()).throw(OSError("offline")), "someone/elsewhere", "models")


def test_gguf_is_dequantized_once_and_cached(monkeypatch, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from finetune import modeling

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    cfg = ModelConfig(model_name_or_path=SMOL_ID, gguf_file=SMOL_FILE)
    dense = modeling.dense_gguf_copy(cfg)
    assert (dense / "config.json").is_file() and list(dense.glob("*.safetensors"))
    assert read_json(dense / "config.json").get("quantization_config") is None
    assert not list(tmp_path.glob("gguf/*.partial-*"))

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_second_conversion)
    assert modeling.dense_gguf_copy(cfg) == dense
    tokenizer = modeling.load_tokenizer(cfg)
    assert tokenizer.pad_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_gguf_trains_on_mrpc(tmp_path: Path) -> None:
    out = tmp_path / "smol"
    code = main(
        [
            "train",
            "glue-mrpc",
            "--model_name_or_path",
            SMOL_ID,
            "--gguf_file",
            SMOL_FILE,
            "--output_dir",
            str(out),
            "--max_train_samples",
            "16",
            "--max_eval_samples",
            "16",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
        ]
    )
    assert code == 0
    assert read_json(out / "config.json")["architectures"] == ["LlamaForSequenceClassification"]
    assert read_json(out / "metrics.json")["eval"]["validation"]["examples"] == 16


def test_wheel_installs_tasks_inside_the_package(tmp_path: Path) -> None:
    # From a copy without build/: pip builds in the source tree, and setuptools would pack modules left in
    # build/lib by an earlier build (a module since moved or deleted) into the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".ci-venv", "build", "dist", "runs", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("finetune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "finetune/tasks/glue.py" in names and "finetune/tasks/__init__.py" in names
    # every module of every subpackage (pyproject lists the packages by hand)
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "finetune").rglob("*.py")]
    sources += ["finetune/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "tasks").rglob("*.py")]
    assert "finetune/hub/push.py" in sources and sorted(set(sources) - set(names)) == []
    assert sorted(n for n in names if n.endswith(".py") and n not in sources) == []
    assert "finetune/recipes/glue-mrpc.yaml" in names
    assert not [n for n in names if n.startswith("tasks/")], "a top-level 'tasks' package would be installed"
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["finetune"]


def test_decoder_gets_pad_token(tiny_model_dir) -> None:
    from finetune import modeling

    tokenizer = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(tiny_model_dir("gpt2"))))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert torch.is_tensor(tokenizer(["a b", "c"], padding=True, return_tensors="pt")["input_ids"])
