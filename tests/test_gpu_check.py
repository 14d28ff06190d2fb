"""benchmarks/gpu_check.py, the parts that run without a GPU: the plan, the FLOPs count, the MFU timing loop
and the bf16 probe (on CPU, with --use_cpu). The script itself has not been run on a GPU here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_plans_runs_that_exist(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry_run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert set(plan["bf16"]) == {"glue_encoder", "decoder_generation", "encoder_decoder_generation"}
    assert set(plan["launch"]) == {"single_gpu", "fsdp_one_process", "smollm2_generation"}
    for command in plan["launch"].values():
        config = command[command.index("--config_file") + 1]
        assert (ROOT / config).is_file(), config
        assert command[command.index("--output_dir") + 1].startswith(str(tmp_path))
    assert plan["launch"]["fsdp_one_process"][plan["launch"]["fsdp_one_process"].index("--num_processes") + 1] == "1"


def test_without_a_gpu_it_says_so_in_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: error: no CUDA GPU visible (torch.cuda.is_available() is False); use --dry_run to see the plan"
    ]


def test_flops_per_token_counts_linear_weights_and_attention() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, num_labels=2)
    model = BertForSequenceClassification(config)
    # per layer: Q, K, V, attention output (32x32 each), intermediate 32x37, output 37x32; pooler 32x32; head 32x2
    linear = 2 * (4 * 32 * 32 + 2 * 32 * 37) + 32 * 32 + 32 * 2
    assert gpu_check.linear_parameters(model) == linear
    assert gpu_check.training_flops_per_token(model, 128) == 6 * linear + 12 * 2 * 128 * 32
    assert gpu_check.mfu(1e9, 1e4, 989.4e12) == pytest.approx(1e13 / 989.4e12)
    assert gpu_check.mfu(1e9, 1e4, None) is None
    # BERT-base: about 85M parameters in Linear layers (the rest are embeddings)
    with torch.device("meta"):
        bert_base = BertForSequenceClassification(BertConfig())
    assert 84e6 < gpu_check.linear_parameters(bert_base) < 86e6


def test_mfu_loop_times_steady_steps_on_cpu() -> None:
    from transformers import BertConfig

    tiny = BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, num_labels=2)
    result = gpu_check.measure_mfu(steps=6, batch=2, skip=2, config=tiny)
    assert result["steps_timed"] == 3 and result["tokens_per_s"] > 0
    assert result["mfu"] is None and result["ok"] is False  # no GPU peak to divide by


def test_bf16_probe_sees_bf16_linear_outputs_and_fp32_weights(tiny_model_dir, tmp_path: Path) -> None:
    """The probe on the real pipeline, on CPU (bf16 autocast works there too, with --use_cpu); a tiny BERT, since
    a CPU without bf16 units emulates bf16 slowly and the probe checks dtypes, not quality."""
    gpu_check.BF16_RUNS["tiny"] = ["glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert"))]
    try:
        result = gpu_check.check_bf16("tiny", tmp_path, extra=("--use_cpu", "true"))
        fp32 = gpu_check.check_bf16("tiny", tmp_path / "fp32", extra=("--use_cpu", "true", "--bf16", "false"))
    finally:
        del gpu_check.BF16_RUNS["tiny"]
    assert result["ok"], result
    assert result["linear_output_dtypes"] == ["torch.bfloat16"]
    assert fp32["exit_code"] == 0 and fp32["linear_output_dtypes"] == ["torch.float32"] and not fp32["ok"]
