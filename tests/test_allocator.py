"""finetune.allocator: a tensor allocated again after it was freed reuses the process's memory (page faults
counted by the kernel, so the check does not depend on the machine's speed or load)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from finetune.allocator import keep_freed_memory
    assert keep_freed_memory()
for _ in range(8):  # the first allocations grow the heap to what a step needs
    torch.zeros(30522, 384)
    torch.randn(1000, 1000)  # something else allocated between steps
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # what every training step does: the word-embedding gradient, zero-filled
    torch.zeros(30522, 384)
    torch.randn(1000, 1000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_allocation(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_mapped_again() -> None:
    pages = 30522 * 384 * 4 // 4096
    assert faults_per_allocation("default") > 0.9 * pages  # glibc maps a 45 MiB block anew every time
    assert faults_per_allocation("kept") < 0.01 * pages


def test_training_keeps_freed_memory(tiny_model_dir, tmp_path) -> None:
    from finetune import allocator, pipeline
    from finetune.config import parse_run_config

    argv = ["--task_name", "mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir",
            str(tmp_path / "run"), "--max_train_samples", "8", "--max_steps", "1", "--report_to", "none"]
    pipeline.prepare_training(parse_run_config(None, argv))
    assert allocator._kept is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("lora", [False, True])
def test_freed_memory_is_kept_only_where_the_embeddings_train(lora: bool, tiny_model_dir, tmp_path, monkeypatch):
    """LoRA freezes the embeddings: keeping freed memory only grew its peak (BENCHMARKS.md 'Decoder memory')."""
    from test_precision import family_argv

    from finetune import allocator, pipeline
    from finetune.config import parse_run_config

    calls: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or True)
    argv = family_argv("summarization", tiny_model_dir("llama"), tmp_path / "run")
    if lora:
        argv += ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    pipeline.prepare_training(parse_run_config(None, argv))
    assert calls == ([] if lora else ["kept"])


# ---------------------------------------------------------------------------------------------------------
# tcmalloc: the command line restarts itself under it where it is installed
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_tcmalloc(monkeypatch) -> str:
    """A glibc process with no replacement preloaded and tcmalloc 'installed' at a fixed path."""
    from finetune import allocator

    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "preloaded_malloc", lambda maps="": None)
    monkeypatch.setattr(allocator, "glibc", lambda: object())
    return "/opt/lib/libtcmalloc_minimal.so.4"


def test_the_restart_preloads_tcmalloc_before_what_the_user_preloaded(fake_tcmalloc: str) -> None:
    from finetune import allocator

    environment = allocator.environment_with_tcmalloc({"PATH": "/bin", "LD_PRELOAD": "/opt/libmine.so"})
    assert environment is not None
    assert environment["LD_PRELOAD"] == f"{fake_tcmalloc} /opt/libmine.so"
    assert environment[allocator.RESTARTED_ENV] == "1" and environment["PATH"] == "/bin"
    assert allocator.environment_with_tcmalloc({})["LD_PRELOAD"] == fake_tcmalloc


@pytest.mark.parametrize("environ", [
    {"FINETUNE_MALLOC": "system"},  # the user's choice
    {"FINETUNE_MALLOC_RESTARTED": "1"},  # restarted once already: a library that failed to preload
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},  # the user's own malloc replacement
])
def test_no_restart_where_the_user_chose_or_it_was_tried(environ: dict, fake_tcmalloc: str) -> None:
    from finetune import allocator

    assert allocator.environment_with_tcmalloc(environ) is None


def test_no_restart_without_tcmalloc_or_glibc(fake_tcmalloc: str, monkeypatch) -> None:
    from finetune import allocator

    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    assert allocator.environment_with_tcmalloc({}) is None
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: fake_tcmalloc)
    monkeypatch.setattr(allocator, "glibc", lambda: None)  # musl, macOS: not restarted either
    assert allocator.environment_with_tcmalloc({}) is None


def test_a_preloaded_malloc_is_read_from_the_process_maps(tmp_path) -> None:
    from finetune import allocator

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f02-7f03 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9\n"
                    "7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n")
    assert allocator.preloaded_malloc(str(maps)) == "tcmalloc (/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9)"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.preloaded_malloc(str(maps)) is None
    assert allocator.preloaded_malloc(str(tmp_path / "missing")) is None


def test_configure_leaves_a_preloaded_malloc_alone(monkeypatch) -> None:
    from finetune import allocator

    monkeypatch.setattr(allocator, "preloaded_malloc", lambda maps="": "tcmalloc (/x/libtcmalloc.so.4)")
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: pytest.fail("glibc tuned under tcmalloc"))
    assert allocator.configure_for(trains_embeddings=True) is False


def test_an_unknown_malloc_choice_is_one_line(tmp_path) -> None:
    env = {**os.environ, "FINETUNE_MALLOC": "dlmalloc"}
    done = subprocess.run([sys.executable, "-m", "finetune", "train", "glue-mrpc", "--output_dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "finetune: error: FINETUNE_MALLOC='dlmalloc': use tcmalloc (the default where installed) or system"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the restart under tcmalloc is for glibc Linux")
def test_a_training_run_records_the_malloc_it_ran_with(tiny_model_dir, tmp_path) -> None:
    """`finetune train` restarts under tcmalloc where it is installed (CI installs libtcmalloc-minimal4), and
    the run says so in run_info.json, as read from its own process's memory map; without tcmalloc it runs on
    glibc's malloc, tuned (a full fine-tuning run keeps its freed memory). In-process runs of the suite record
    glibc's: test_run_info_records_glibc_in_process."""
    from finetune import allocator

    def trained(name: str, malloc: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.RESTARTED_ENV)}
        out = tmp_path / name
        done = subprocess.run(
            [sys.executable, "-m", "finetune", "train", "--task_name", "mrpc", "--model_name_or_path",
             str(tiny_model_dir("bert")), "--output_dir", str(out), "--max_train_samples", "8", "--max_eval_samples",
             "8", "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--load_best_model_at_end",
             "false", "--disable_tqdm", "true"],
            capture_output=True, text=True, timeout=300, env={**env, allocator.MALLOC_ENV: malloc})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "tcmalloc: large alloc" not in done.stderr
        return json.loads((out / "run_info.json").read_text())["malloc"]

    library = allocator.tcmalloc_library()
    if library is None:  # the C library's malloc, then
        assert trained("system", "tcmalloc") == "glibc (freed memory kept)"
        pytest.skip("no tcmalloc installed here (apt-get install libtcmalloc-minimal4); the glibc run passed")
    assert trained("tcmalloc", "tcmalloc") == f"tcmalloc ({os.path.realpath(library)})"


def test_run_info_records_glibc_in_process(tiny_model_dir, tmp_path) -> None:
    """A run started from Python (not the command line) is not restarted: it records the C library's malloc."""
    from finetune import allocator
    from finetune.cli import main

    if platform.libc_ver()[0] != "glibc" or allocator.preloaded_malloc():
        pytest.skip("glibc's malloc is what is recorded here (this pytest runs under another)")
    out = tmp_path / "run"
    assert main(["train", "--task_name", "mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir",
                 str(out), "--max_train_samples", "8", "--max_eval_samples", "8", "--max_steps", "1", "--report_to",
                 "none", "--save_strategy", "no", "--load_best_model_at_end", "false"]) == 0
    assert json.loads((out / "run_info.json").read_text())["malloc"] == "glibc (freed memory kept)"
