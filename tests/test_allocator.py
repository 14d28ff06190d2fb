"""finetune.allocator: a tensor allocated again after it was freed reuses the process's memory (page faults
counted by the kernel, so the check does not depend on the machine's speed or load)."""

from __future__ import annotations

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
