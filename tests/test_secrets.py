"""A Hub token, given as ``--hub_token`` or as ``HF_TOKEN``, is used for the Hub and written nowhere.

Every command that takes hub settings runs with a sentinel token against the stubbed Hub: training with each
``hub_strategy`` (classification, and a generation model, whose arguments are Seq2SeqTrainingArguments),
``glue``, ``push`` (real and ``--dry_run``, of a run and of a GLUE folder), ``evaluate`` and ``predict``.
Then every byte of every file they wrote (pickled ``training_args.bin`` in the run and its checkpoints
included, datasets caches too) and everything printed is searched for the token.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import datasets
import pytest
import torch
from conftest import SAMPLES
from test_publish import FakeHub

from finetune.cli import main
from finetune.hub import client

SENTINEL = f"hf_SENTINEL{uuid.uuid4().hex}"
SMALL = ["--max_train_samples", "8", "--max_eval_samples", "8", "--num_train_epochs", "1",
         "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]
WMT = SAMPLES / "wmt16_en_ro_sample"


@pytest.fixture
def stub_hub(monkeypatch) -> FakeHub:
    """The Hub as finetune's client and the Trainer's own pushes see it; records the tokens handed to it."""
    fake = FakeHub()
    fake.tokens = []

    def api(token):
        fake.tokens.append(token)
        return fake

    fake.serve_trainer_uploads(monkeypatch)
    monkeypatch.setattr(client, "hub_api", api)
    return fake


@pytest.mark.parametrize("given_as", ["flag", "HF_TOKEN"])
def test_the_hub_token_is_never_written_or_printed(
    given_as: str, stub_hub: FakeHub, tiny_model_dir, tmp_path: Path, monkeypatch, capfd
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    if given_as == "flag":
        monkeypatch.delenv("HF_TOKEN", raising=False)
        token = ["--hub_token", SENTINEL]
    else:
        monkeypatch.setenv("HF_TOKEN", SENTINEL)
        token = []
    bert, runs = tiny_model_dir("bert"), tmp_path / "runs"

    for strategy in ("end", "every_save", "checkpoint", "all_checkpoints"):
        assert main(["train", "glue-mrpc", "--model_name_or_path", str(bert), "--output_dir", str(runs / strategy),
                     *SMALL, "--push_to_hub", "true", "--hub_model_id", f"me/{strategy}", "--hub_strategy", strategy,
                     *token]) == 0
    assert main(["train", "--task", "translation", "--model_name_or_path", str(tiny_model_dir("t5")),
                 "--output_dir", str(runs / "t5"), "--train_file", str(WMT / "train.jsonl"),
                 "--validation_file", str(WMT / "val.jsonl"), "--source_lang", "en", "--target_lang", "ro",
                 "--max_new_tokens", "4", *SMALL, "--push_to_hub", "true", "--hub_model_id", "me/t5",
                 "--hub_strategy", "checkpoint", *token]) == 0
    assert main(["glue", "--model_name_or_path", str(bert), "--tasks", "rte", "--output_dir", str(runs / "glue"),
                 *SMALL, "--max_predict_samples", "4", *token]) == 0
    for folder in ("end", "glue"):
        assert main(["push", str(runs / folder), "--dry_run", *token]) == 0
    assert main(["push", str(runs / "glue"), "--hub_model_id", "me/glue", *token]) == 0
    assert main(["evaluate", str(runs / "end"), "--output_dir", str(runs / "evaluated"), *token]) == 0
    assert main(["predict", str(runs / "end"), "--split", "validation", "--output_dir", str(runs / "predicted"),
                 *token]) == 0

    # The token reached the Hub: finetune's client, and the Trainer's own uploads (where it is not the default)
    pushed = [name for name, _, _ in stub_hub.calls]
    assert pushed.count("create_commit") == 6 and pushed.count("upload_folder") >= 6
    assert stub_hub.tokens and set(stub_hub.tokens) == {SENTINEL}
    trainer_tokens = {kwargs.get("token") for name, _, kwargs in stub_hub.calls if name == "upload_folder"}
    assert trainer_tokens == ({SENTINEL} if given_as == "flag" else {None})

    # ... and nowhere else
    printed = capfd.readouterr()
    assert SENTINEL not in printed.out + printed.err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    pickles = [p for p in written if p.name == "training_args.bin"]
    assert len(written) > 100 and len(pickles) >= 8  # runs and checkpoints of every strategy, t5, glue
    leaks = [str(p.relative_to(tmp_path)) for p in written if SENTINEL.encode() in p.read_bytes()]
    assert leaks == []
    # The pickled arguments still load, with everything but the token.
    args = torch.load(runs / "checkpoint" / "training_args.bin", weights_only=False)
    assert args.hub_model_id == "me/checkpoint" and args.hub_strategy == "checkpoint" and args.hub_token is None
