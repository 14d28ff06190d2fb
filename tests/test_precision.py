"""Precision decided per run (issue 23): bf16 autocast where the CPU has bf16 units, fp32 elsewhere, and
``--bf16 true`` working on a CPU for every task family, with LoRA and under two processes.

The CPU's flags are mocked both ways through ``FINETUNE_CPU_FLAGS`` (conftest pins it empty for the suite);
what a run computes in is observed with forward hooks on the model's Linear layers during training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SAMPLES, read_json

from finetune import pipeline, precision
from finetune.cli import main
from finetune.config import parse_run_config

XSUM = SAMPLES / "xsum_sample" / "sample.jsonl"
AMD_EPYC = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"  # flags of this project's 2-core host
SAPPHIRE_RAPIDS = "avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
OLD_XEON = "sse2 avx avx2 fma avx512f avx512bw"  # AVX-512 without bf16: oneDNN emulates it
TINY = ["--max_train_samples", "8", "--max_eval_samples", "4", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true"]


def family_argv(family: str, model: Path, out: Path) -> list[str]:
    if family == "glue":
        return ["--task_name", "mrpc", "--model_name_or_path", str(model), "--output_dir", str(out), *TINY]
    return ["--task", "summarization", "--model_name_or_path", str(model), "--output_dir", str(out),
            "--train_file", str(XSUM), "--validation_split_percentage", "30", "--max_seq_length", "64",
            "--max_target_length", "16", "--max_new_tokens", "4", *TINY]


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Set the CPU flags finetune sees, on a machine without an accelerator and outside any launch."""
    monkeypatch.setattr(precision, "accelerator_kind", lambda: None)
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    return lambda flags: monkeypatch.setenv(precision.FLAGS_ENV, flags)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(precision.FLAGS_ENV)
    x86 = tmp_path / "x86"
    x86.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {AMD_EPYC}\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n")
    assert precision.cpu_flags(x86) == frozenset(AMD_EPYC.split())
    assert "bf16" in precision.cpu_flags(arm)
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()
    assert precision.cpu_bf16_unit(precision.cpu_flags(x86)).name == "AVX512-BF16"
    assert precision.cpu_bf16_unit(frozenset(SAPPHIRE_RAPIDS.split())).name == "AMX-BF16"  # the stronger unit
    assert precision.cpu_bf16_unit(precision.cpu_flags(arm)) is None  # arm64 bf16: not measured, so fp32
    monkeypatch.setenv(precision.FLAGS_ENV, "avx2 amx_bf16")
    assert precision.cpu_flags(x86) == {"avx2", "amx_bf16"}  # the override wins over the file


@pytest.mark.parametrize("flags, bf16, unit", [(AMD_EPYC, True, "AVX512-BF16"), (SAPPHIRE_RAPIDS, True, "AMX-BF16"),
                                               (OLD_XEON, False, None), ("", False, None)])
def test_unset_precision_follows_the_cpu(cpu, flags: str, bf16: bool, unit: str | None) -> None:
    cpu(flags)
    config = parse_run_config("glue-mrpc")
    assert config.training.bf16 is bf16 and config.training.mixed_precision == ("bf16" if bf16 else "no")
    assert config.training.use_cpu is bf16  # what TrainingArguments needs for bf16 without a GPU
    if bf16:
        assert config.precision.startswith(f"bf16 autocast: the CPU has {unit}")
    else:
        assert config.precision.startswith("fp32: this CPU has no bf16 matrix units")
    assert config.to_dict()["precision"] == config.precision


def test_what_the_user_or_the_launch_sets_wins(cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu(AMD_EPYC)
    off = parse_run_config("glue-mrpc", ["--bf16", "false"])
    assert not off.training.bf16 and not off.training.use_cpu and off.precision == "fp32: --bf16 false given"
    cpu(OLD_XEON)
    forced = parse_run_config("glue-mrpc", ["--bf16", "true"])
    assert forced.training.bf16 and forced.training.use_cpu
    assert forced.precision.startswith("bf16 autocast: --bf16 true given; this CPU has no bf16 units")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    launched = parse_run_config("glue-mrpc")
    assert launched.training.bf16 and launched.training.use_cpu and "accelerate config" in launched.precision
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's default: the CPU decides
    cpu(AMD_EPYC)
    assert parse_run_config("glue-mrpc").training.bf16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp = parse_run_config("glue-mrpc")
    assert not fsdp.training.bf16 and fsdp.precision.startswith("fp32: FSDP on a CPU")


def linear_output_dtypes(trainer) -> Counter:
    """Train, counting the dtypes of every Linear layer's output in training-mode forwards."""
    seen: Counter = Counter()

    def record(module, inputs, output) -> None:
        # numel 0: a decoder's head under the chunked loss computes no logits in the forward (it keeps its input)
        if module.training and isinstance(output, torch.Tensor) and output.numel():
            seen[output.dtype] += 1

    hooks = [m.register_forward_hook(record) for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        trainer.train()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("family, arch, extra", [
    ("glue", "bert", []),
    ("glue", "distilbert", []),  # an encoder without token_type_ids
    ("summarization", "llama", []),  # decoder-only (pad token = a special token of the tiny tokenizer)
    ("summarization", "gpt2", ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]),  # LoRA
    ("summarization", "t5", []),  # encoder-decoder
])
def test_bf16_autocast_in_effect_with_fp32_master_weights(
    cpu, family: str, arch: str, extra: list[str], tiny_model_dir, tmp_path: Path, caplog
) -> None:
    cpu(AMD_EPYC)
    out = tmp_path / "run"
    config = parse_run_config(None, [*family_argv(family, tiny_model_dir(arch), out), *extra])
    with caplog.at_level("WARNING", logger="finetune"):
        run = pipeline.prepare_training(config)
    seen = linear_output_dtypes(run.trainer)
    assert seen and set(seen) == {torch.bfloat16}, seen  # every Linear computed in bf16
    trainable = [p for p in run.trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # master weights stay fp32
    saved = yaml.safe_load((out / "finetune_config.yaml").read_text())
    assert saved["training"]["bf16"] is True and saved["precision"] == config.precision
    assert read_json(out / "run_info.json")["precision"] == config.precision
    assert [r.message for r in caplog.records if r.message.startswith("precision ")] == [
        f"precision {config.precision}"
    ]


def test_without_bf16_units_the_same_run_is_fp32(cpu, tiny_model_dir, tmp_path: Path) -> None:
    cpu(OLD_XEON)
    config = parse_run_config(None, family_argv("glue", tiny_model_dir("bert"), tmp_path / "run"))
    assert set(linear_output_dtypes(pipeline.prepare_training(config).trainer)) == {torch.float32}


def test_a_recipe_with_bf16_true_trains_on_the_cpu_and_the_card_says_so(
    cpu, tiny_model_dir, tmp_path: Path, capsys
) -> None:
    cpu(OLD_XEON)
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("# MRPC in bf16\ndata:\n  task_name: mrpc\ntraining:\n  bf16: true\n")
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir",
                 str(out), *TINY]) == 0
    info = read_json(out / "run_info.json")
    assert info["precision"].startswith("bf16 autocast: --bf16 true given")  # a recipe's setting is given too
    capsys.readouterr()
    assert main(["push", str(out), "--dry_run", "--hub_model_id", "me/tiny"]) == 0
    assert f"| precision | {info['precision']} |" in capsys.readouterr().out


PROBE = """
import json, sys, torch
from collections import Counter
from finetune import pipeline
from finetune.config import parse_run_config

config = parse_run_config(None, sys.argv[2:])
run = pipeline.prepare_training(config)
seen = Counter()
def record(module, inputs, output):
    if module.training:
        seen[str(output.dtype)] += 1
for module in run.trainer.model.modules():
    if isinstance(module, torch.nn.Linear):
        module.register_forward_hook(record)
run.trainer.train()
rank = run.trainer.args.process_index
master = sorted({str(p.dtype) for p in run.trainer.model.parameters() if p.requires_grad})
json.dump({"world": run.trainer.args.world_size, "linear": dict(seen), "master": master,
           "precision": config.precision}, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
"""


@pytest.mark.distributed
def test_bf16_under_two_cpu_processes(tiny_model_dir, tmp_path: Path) -> None:
    """accelerate launch with 2 gloo processes, flags of a bf16 CPU: both ranks autocast, master weights fp32."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    env[precision.FLAGS_ENV] = AMD_EPYC
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    launcher = Path(sys.executable).parent / "accelerate"
    argv = family_argv("glue", tiny_model_dir("bert"), tmp_path / "run")
    done = subprocess.run(
        [str(launcher), "launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"), str(script),
         str(tmp_path), *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["master"] == ["torch.float32"]
        assert set(rank["linear"]) == {"torch.bfloat16"} and rank["precision"].startswith("bf16 autocast")


def eval_linear_output_dtypes(run) -> Counter:
    """Generate on the run's evaluation split, counting the dtypes of every eval-mode Linear layer's output."""
    seen: Counter = Counter()

    def record(module, inputs, output) -> None:
        # The chunked loss's head returns an empty tensor for its input (no product computed): not counted.
        if not module.training and isinstance(output, torch.Tensor) and output.numel():
            seen[output.dtype] += 1

    hooks = [m.register_forward_hook(record) for m in run.trainer.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        output = run.task.predict(run.trainer, run.tokenized[run.eval_splits[0]], run.eval_splits[0])
    finally:
        for hook in hooks:
            hook.remove()
    assert output.predictions is not None and len(output.predictions) == len(run.tokenized[run.eval_splits[0]])
    return seen


@pytest.mark.parametrize("arch, extra", [
    ("llama", []),  # decoder-only: GenerationTrainer.prediction_step generates from the prompt itself
    ("gpt2", ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]),  # peft's generate calls the base
    ("t5", []),  # encoder-decoder: Seq2SeqTrainer's own prediction_step
])
def test_generation_in_evaluation_runs_under_bf16_autocast(
    cpu, arch: str, extra: list[str], tiny_model_dir, tmp_path: Path
) -> None:
    """Issue 24.4: evaluation's generate computes in the run's precision, not in fp32 beside a bf16 training."""
    cpu(AMD_EPYC)
    config = parse_run_config(None, [*family_argv("summarization", tiny_model_dir(arch), tmp_path / "run"), *extra])
    run = pipeline.prepare_training(config)
    run.trainer.train()
    seen = eval_linear_output_dtypes(run)
    assert seen and set(seen) == {torch.bfloat16}, seen
