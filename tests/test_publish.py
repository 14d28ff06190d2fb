"""Pushing runs to the Hub, with the Hub stubbed at the HfApi boundary (there is no network here).

The stub records what `finetune.hub` asks of `HfApi` and answers like the Hub would, or fails like
it does (401, 403, 409, 503, connection errors), so the real card, file list, retries and error
messages are exercised.
"""

from __future__ import annotations

import hashlib
import shlex
import uuid
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
import yaml
from conftest import MINILM, read_json
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from finetune import config as config_module
from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.hub import card, client, push

FAKE_TOKEN = f"hf_fake{uuid.uuid4().hex}"


class FakeHub(HfApi):
    """HfApi whose network methods record their calls; ``failures`` are raised first, in order."""

    def __init__(self, failures: list[BaseException] | None = None):
        super().__init__(token=False)
        self.calls: list[tuple[str, tuple, dict]] = []
        self.failures = list(failures or [])

    def _record(self, name: str, *args, **kwargs) -> None:
        self.calls.append((name, args, kwargs))
        if self.failures:
            raise self.failures.pop(0)

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id, **kwargs)
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{full}")

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", repo_id, **kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        self._record("create_commit", repo_id, list(operations), **kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    def upload_folder(self, **kwargs):  # the Trainer's own push: must not happen with hub_strategy=end
        self._record("upload_folder", **kwargs)

    def model_info(self, repo_id, **kwargs):
        self._record("model_info", repo_id, **kwargs)
        raise httpx2.ConnectError("no network in tests")

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def serve_trainer_uploads(self, monkeypatch) -> None:
        """Be the Hub of the Trainer's own pushes, which upload in the background and wait on the futures."""

        def upload_folder(**kwargs):
            self.calls.append(("upload_folder", (), kwargs))
            done: Future = Future()
            done.set_result(None)
            return done

        monkeypatch.setattr(self, "upload_folder", upload_folder)
        monkeypatch.setattr("transformers.trainer.hf_api", lambda: self)


def http_error(status: int, message: str = "") -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError(f"{status} Client Error{message}", response=response)


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(client, "hub_api", lambda token: fake)
    return fake


def train_pushed(model_dir: Path, out: Path, *extra: str) -> int:
    return main([
        "train", "glue-mrpc", "--model_name_or_path", str(model_dir), "--output_dir", str(out),
        "--max_train_samples", "24", "--max_eval_samples", "16", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--push_to_hub", "true", "--hub_model_id", "me/tiny-mrpc", *extra,
    ])


def snapshot(run_dir: Path) -> dict[str, str]:
    """Hash of every file the push must not touch (the card and curves are rewritten on purpose)."""
    skip = (card.CARD_NAME, card.CURVES_NAME)
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name not in skip
    }


def test_train_push_dry_run_failures_and_the_token_never_written(
    hub: FakeHub, tiny_model_dir, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "run"
    assert train_pushed(tiny_model_dir("bert"), out, "--hub_revision", "exp", "--hub_private_repo", "true") == 0

    # the Trainer did not push; finetune made the repo, the branch and one commit with the card
    assert hub.names() == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[0][1] == ("me/tiny-mrpc",) and hub.calls[0][2]["private"] is True
    assert hub.calls[1][2]["branch"] == "exp"
    _, (repo_id, operations), kwargs = hub.calls[2]
    assert repo_id == "me/tiny-mrpc" and kwargs["revision"] == "exp"
    uploaded = {op.path_in_repo for op in operations}
    assert {"README.md", "config.json", "model.safetensors", "metrics.json", "finetune_config.yaml",
            "training_curves.png", "trainer_state.json", "predictions_validation.jsonl"} <= uploaded
    assert not any(name.startswith("checkpoint-") or name == "training_args.bin" for name in uploaded)
    assert {op.path_in_repo for op in operations} == {p for _, p in push.run_files(out)}

    # the card's metadata parses with huggingface_hub's helpers and holds the run's metrics
    metadata = metadata_load(out / "README.md")
    name, results = model_index_to_eval_results(metadata["model-index"])
    validation = read_json(out / "metrics.json")["eval"]["validation"]
    assert name == "tiny-mrpc"
    assert {(r.metric_type, r.dataset_type, r.dataset_config, r.dataset_split, r.task_type) for r in results} == {
        ("f1", "nyu-mll/glue", "mrpc", "validation", "text-classification"),
        ("accuracy", "nyu-mll/glue", "mrpc", "validation", "text-classification"),
    }
    assert {r.metric_type: r.metric_value for r in results} == pytest.approx(
        {"f1": validation["f1"], "accuracy": validation["accuracy"]}, abs=1e-4
    )
    assert metadata["datasets"] == ["nyu-mll/glue"] and metadata["pipeline_tag"] == "text-classification"
    card = ModelCard.load(out / "README.md")
    assert "training_curves.png" in card.text and "finetune train glue-mrpc" in card.text
    assert "transformers" in card.text and "learning_rate" in card.text
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what the user asked for is what the saved config records
    saved = yaml.safe_load((out / "finetune_config.yaml").read_text())
    assert saved["training"]["push_to_hub"] is True and saved["training"]["hub_model_id"] == "me/tiny-mrpc"

    # dry run: repo, files and card, without calling the Hub
    hub.calls.clear()
    capsys.readouterr()
    assert main(["push", str(out), "--dry_run", "--hub_model_id", "me/other"]) == 0
    shown = capsys.readouterr().out
    assert hub.calls == []
    assert "repo: me/other" in shown and "model.safetensors" in shown and "model-index:" in shown

    # failures: one line, exit code 2, the run directory untouched; the token is in none of them
    before = snapshot(out)
    leaky = http_error(403, f" for url with Bearer {FAKE_TOKEN}")  # a message that would leak if not redacted
    expected = {
        401: "rejected the token (401)",
        403: "no write access to me/tiny-mrpc (403)",
        409: "conflicts with an existing repo (409)",
    }
    for status, words in expected.items():
        hub.failures = [leaky if status == 403 else http_error(status)]
        assert main(["push", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert snapshot(out) == before

    # transient errors are retried (without sleeping here), then the push goes through
    waits: list[float] = []
    hub.failures, hub.calls = [http_error(503), httpx2.ConnectError("connection reset")], []
    assert push.push_run(out, sleep=waits.append) is not None
    assert waits == [1.0, 2.0] and hub.names() == ["create_repo"] * 3 + ["create_branch", "create_commit"]
    # ... and give up with one line when the network stays down
    hub.failures = [httpx2.ConnectError("network is unreachable")] * client.RETRY_ATTEMPTS
    with pytest.raises(FinetuneError, match="did not answer .* after 4 attempts"):
        push.push_run(out, sleep=lambda s: None)
    assert snapshot(out) == before

    # no token at all
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(out)]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err

    captured = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    leaks = [str(p) for p in written if FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == [] and FAKE_TOKEN not in captured.out + captured.err


def test_checkpoint_strategy_lets_the_trainer_push_checkpoints(hub: FakeHub, tiny_model_dir, tmp_path, monkeypatch):
    hub.serve_trainer_uploads(monkeypatch)
    out = tmp_path / "run"
    assert train_pushed(tiny_model_dir("bert"), out, "--hub_strategy", "checkpoint", "--hub_revision", "exp") == 0
    names = hub.names()
    assert names[:2] == ["create_repo", "create_branch"]  # before training: the Trainer pushes into the branch
    pushes = [kwargs for name, _, kwargs in hub.calls if name == "upload_folder"]
    assert any(p.get("path_in_repo") == "last-checkpoint" for p in pushes)
    assert all(p["revision"] == "exp" for p in pushes)
    assert names[-1] == "create_commit"  # the card and final model come last
    assert "model-index" in metadata_load(out / "README.md")


def test_train_with_push_fails_before_training_without_token(tiny_model_dir, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = tmp_path / "run"
    assert train_pushed(tiny_model_dir("bert"), out) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


def test_push_refuses_an_unfinished_run(tmp_path: Path, capsys) -> None:
    (tmp_path / "half").mkdir()
    assert main(["push", str(tmp_path / "half"), "--dry_run"]) == 2
    assert "not a finished finetune run" in capsys.readouterr().err


def test_base_model_and_license_from_the_mirror_copy() -> None:
    assert card.base_model_id(str(MINILM)) == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.base_model_id("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.base_license("sentence-transformers/all-MiniLM-L6-v2", None, api=None) == "apache-2.0"
    assert card.base_model_id("/no/such/dir/model") is None


def test_the_card_reproduces_the_run_from_scratch_as_recorded_at_train_time(
    tiny_model_dir, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Issue 11.8: a resumed run's card has no --resume_from_checkpoint, and pushing from a GPU machine does
    not re-derive the command (nor rewrite the run's saved config)."""
    out = tmp_path / "run"
    flags = ["--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(out),
             "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "8",
             "--eval_strategy", "steps", "--save_strategy", "steps", "--eval_steps", "1", "--save_steps", "1",
             "--report_to", "none"]
    assert main(["train", "glue-mrpc", *flags, "--max_steps", "1"]) == 0
    resumed = ["--max_steps", "2", "--resume_from_checkpoint", "last", "--hub_token", FAKE_TOKEN]
    assert main(["train", "glue-mrpc", *flags, *resumed]) == 0
    recorded = read_json(out / "run_info.json")
    assert recorded["command"] == shlex.join(["finetune", "train", "glue-mrpc", *flags, "--max_steps", "2"])
    assert (recorded["dataset"], recorded["dataset_config"], recorded["best_metric"]) == ("nyu-mll/glue", "mrpc", "f1")
    saved_config = (out / "finetune_config.yaml").read_bytes()

    def pushed_card() -> str:
        capsys.readouterr()
        assert main(["push", str(out), "--dry_run", "--hub_model_id", "me/tiny"]) == 0
        return capsys.readouterr().out

    card = pushed_card()
    assert f"```bash\n{recorded['command']}\n```" in card and FAKE_TOKEN not in card
    gpu = SimpleNamespace(is_available=lambda: True, is_bf16_supported=lambda *a, **k: True)
    monkeypatch.setattr(config_module, "torch", SimpleNamespace(cuda=gpu))  # the pushing machine has a GPU
    assert pushed_card() == card
    assert (out / "finetune_config.yaml").read_bytes() == saved_config
    assert FAKE_TOKEN not in (out / "run_info.json").read_text() + (out / "README.md").read_text()
