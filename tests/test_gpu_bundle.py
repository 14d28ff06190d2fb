"""benchmarks/gpu_bundle.py and ``gpu_check.py --bundle``, on the CPU: the bundle the lent GPU machine runs
from is built from ../shared (and PyPI, for the wheels), fits the 60 MiB carry, holds every file each step
reads, and sets up what the project's own loaders expect. No GPU step runs here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MINILM, MIRROR, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bundle  # noqa: E402
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-bundle") / ".gpu"
    done = subprocess.run([sys.executable, "benchmarks/gpu_bundle.py", "--out", str(out), "--mirror", str(MIRROR)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def dry_run(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--bundle", str(bundle), "--dry_run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def linked_copy(bundle: Path, target: Path) -> Path:
    """A copy of the bundle made of hard links: a file deleted from it stays in the original."""
    shutil.copytree(bundle, target, copy_function=os.link)
    return target


def test_bundle_fits_and_carries_only_what_the_image_lacks(bundle: Path) -> None:
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size <= 60 * 2**20, f"{size / 2**20:.1f} MiB"
    wheels = {w["name"] for w in gpu_bundle.bundle_wheels(bundle)}
    assert {"datasets", "evaluate", "rouge-score", "nltk", "dill", "multiprocess"} <= wheels
    assert not wheels & gpu_bundle.IMAGE_PACKAGES  # no torch, no transformers: the image's own stay in charge
    assert not wheels & {"gguf", "optuna"}
    manifest = json.loads((bundle / gpu_bundle.MANIFEST).read_text())
    assert set(manifest["wheels"]) == wheels and manifest["bytes"] < size
    assert not (bundle / gpu_bundle.MINILM_DIR / "model.safetensors").exists()  # the fp32 weights would not fit


def test_dry_run_finds_every_file_each_step_reads(bundle: Path) -> None:
    done = dry_run(bundle)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bundle"]["ok"] and report["bundle"]["problems"] == []
    assert set(report["steps"]) == set(gpu_check.CHECKS)


def test_dry_run_names_a_missing_file_and_a_missing_wheel(bundle: Path, tmp_path: Path) -> None:
    broken = linked_copy(bundle, tmp_path / "broken")
    gone = "hub/datasets/allenai/scitldr/Abstract/validation-00000-of-00001.parquet"
    (broken / gone).unlink()
    next((broken / "wheels").glob("datasets-*.whl")).unlink()
    done = dry_run(broken)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert any(gone in line and "smollm2_generation" in line for line in lines), done.stderr
    assert any("import datasets: no wheel" in line for line in lines), done.stderr
    assert any("evaluate" in line and "needs datasets" in line for line in lines), done.stderr


def test_the_bundle_mirror_loads_with_datasets(bundle: Path, tmp_path: Path) -> None:
    """MRPC whole and the SciTLDR subset, with their label names, from the bundle's hub/ as from ../shared.
    A private cache: datasets served the full mirror's cached SciTLDR for the subset folder here (the device
    starts with an empty cache)."""
    import datasets
    from datasets import ClassLabel

    mrpc = datasets.load_dataset(str(bundle / "hub/datasets/nyu-mll/glue"), "mrpc", cache_dir=str(tmp_path))
    assert {split: len(rows) for split, rows in mrpc.items()} == {"train": 3668, "validation": 408, "test": 1725}
    assert isinstance(mrpc["train"].features["label"], ClassLabel)
    scitldr = datasets.load_dataset(str(bundle / "hub/datasets/allenai/scitldr"), "Abstract", cache_dir=str(tmp_path))
    assert {split: len(rows) for split, rows in scitldr.items()} == gpu_bundle.SCITLDR_ROWS


def test_prepare_gives_fp32_minilm_and_a_smollm2_copy_where_finetune_looks(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device's setup, on the CPU: MiniLM loads in fp32 with its real weights (to bf16 rounding), and
    finetune takes the seeded SmolLM2 folder for its dense GGUF copy instead of converting (no gguf there)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from finetune import modeling
    from finetune.config import ModelConfig

    gpu_check.working_mirror(bundle, tmp_path)
    result = gpu_check.prepare(bundle, tmp_path)
    assert result["ok"] and result["smollm2_parameters"] > 130e6

    written = load_file(tmp_path / "hub/models" / gpu_bundle.MINILM / "model.safetensors")
    original = load_file(MINILM / "model.safetensors")
    assert written.keys() == original.keys()
    floats = [k for k in written if original[k].is_floating_point()]
    assert floats and all(written[k].dtype == torch.float32 for k in floats)
    assert all(torch.equal(written[k], original[k].to(torch.bfloat16).float()) for k in floats)
    assert all(torch.equal(written[k], original[k]) for k in written.keys() - floats)  # position ids
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hub/models" / gpu_bundle.MINILM)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    monkeypatch.setenv(modeling.CACHE_ENV, str(tmp_path / "cache"))
    found = modeling.checkpoint_path(ModelConfig(model_name_or_path=gpu_bundle.SMOLLM2,
                                                 gguf_file=gpu_bundle.SMOLLM2_GGUF))
    assert Path(found) == gpu_check.seeded_smollm2(tmp_path)
    assert (Path(found) / "model.safetensors").is_file() and (Path(found) / "tokenizer.json").is_file()


def test_source_overlay_puts_tasks_inside_the_package(tmp_path: Path) -> None:
    """The checkout runs uninstalled on the device: finetune.tasks must resolve as the installed layout does."""
    src = gpu_check.source_overlay(tmp_path)
    script = "import finetune.tasks.glue as g, finetune; print(finetune.__file__); print(g.__file__)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    package, glue = done.stdout.split()
    assert package == str(src / "finetune" / "__init__.py")
    assert Path(glue).resolve() == ROOT / "tasks" / "glue.py"


def test_a_step_that_hangs_is_killed_at_its_limit(tmp_path: Path) -> None:
    """One hang must not eat the device budget: the step and its children end at the step's limit."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    command = [sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               f"{child!r}]); time.sleep(300)"]
    code, seconds = gpu_check.run_limited(command, None, tmp_path, 5, tmp_path / "hang.log")
    assert code is None and seconds < 30
    assert pid_file.is_file(), "the grandchild never started: the test proves nothing"
    assert ended(int(pid_file.read_text()))


def ended(pid: int, wait_s: float = 10) -> bool:
    """Whether the process is gone or a zombie (dead, awaiting its reaper), allowing it time to finish dying."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False
