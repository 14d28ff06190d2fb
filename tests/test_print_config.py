"""`--print_config` (train, tune, glue) prints the resolved settings and loads and writes nothing;
`finetune --version` names the versions and the device (issue 25)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from conftest import read_json  # noqa: F401  (conftest sets the offline mirror)

from finetune.cli import main
from finetune.config import parse_run_config

FAKE_TOKEN = "hf_printconfigNEVERshown1234567890"


def test_train_print_config_is_the_resolved_config_file(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default output_dir (runs/glue-mrpc) would be created here
    argv = ["glue-mrpc", "--learning_rate", "3e-5", "--hub_token", FAKE_TOKEN]
    assert main(["train", *argv, "--print_config"]) == 0
    printed = capsys.readouterr().out
    document = yaml.safe_load(printed)
    expected = parse_run_config("glue-mrpc", argv[1:])
    assert printed == expected.to_yaml()  # byte for byte what finetune_config.yaml would hold
    assert document["training"]["learning_rate"] == 3e-5  # the override
    assert document["training"]["metric_for_best_model"] == "f1"  # derived from the task
    assert document["training"]["output_dir"] == "runs/glue-mrpc"  # derived from the recipe
    assert document["precision"].startswith("fp32: this CPU has no bf16")  # the suite's CPU (conftest)
    assert FAKE_TOKEN not in printed
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_print_config_still_refuses_bad_settings(capsys) -> None:
    assert main(["train", "glue-mrpc", "--learning_rate", "-1", "--print_config"]) == 2
    assert "--learning_rate -1" in capsys.readouterr().err


def test_tune_and_glue_print_their_configs(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "glue-rte", "--n_trials", "3", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tune"]["n_trials"] == 3
    assert main(["glue", "--model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2", "--tasks", "rte,cola",
                 "--seeds", "2", "--num_train_epochs", "1", "--print_config"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["data"]["task_name"] for d in documents] == ["cola", "rte"]  # GLUE's table order
    assert all(d["training"]["num_train_epochs"] == 1 and d["training"]["seed"] == 42 for d in documents)
    assert documents[0]["training"]["output_dir"] == os.path.join("runs", "glue-all-MiniLM-L6-v2", "cola", "seed-42")
    assert list(tmp_path.iterdir()) == []


def test_version_names_libraries_and_device(capsys) -> None:
    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("finetune ") and any(line.startswith("transformers 5.") for line in lines)
    assert any(line.startswith("torch ") for line in lines) and any(line.startswith("accelerate ") for line in lines)
    assert any(line.startswith("cpu: ") for line in lines) and any(line.startswith("gpu: ") for line in lines)
