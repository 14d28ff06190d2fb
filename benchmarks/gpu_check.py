"""One-shot GPU check: bf16 really in effect, BERT-base MFU at sequence length 128, and the GPU launch paths.

Run it from the repository root on a machine with one CUDA GPU (about 5 minutes on an H100/H200; the plan
is sized to stay under 8) and read the one JSON summary it prints last:

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/gpu_check.py [--json benchmarks/results/gpu_check.json]
    python benchmarks/gpu_check.py --dry_run      # the plan (commands, sizes) without a GPU

Checks, each with "ok" in the summary (exit code 0 only if all are ok):

- ``bf16``: for each task family (GLUE encoder classification, decoder-only generation with SmolLM2,
  encoder-decoder generation), two optimizer steps of the real ``finetune train`` pipeline with ``--bf16
  true``; forward hooks on the model's Linear layers must see bfloat16 outputs (autocast in effect) while
  the trainable weights stay float32 (master weights).
- ``mfu``: a BERT-base-sized model (bert-base-uncased's config, random weights) trained with the Trainer on
  fixed-length 128-token batches, bf16, fused AdamW; model FLOPs per token = 6 x (Linear parameters) +
  12 x layers x 128 x hidden (attention scores and weighted sum, forward + backward); MFU = FLOPs/s over
  the GPU's dense bf16 peak (``benchmarks/throughput.py``'s table; H100/H200 989 TFLOPS). Target >= 35%.
- ``single_gpu``: ``accelerate launch --config_file launch/single_gpu.yaml -m finetune train glue-mrpc``.
- ``fsdp_one_process``: the same with ``launch/fsdp.yaml --num_processes 1``: FSDP2 sharded checkpoint
  (``pytorch_model_fsdp_0/*.distcp``) and a full final model.
- ``smollm2_generation``: ``summarization-scitldr`` (SmolLM2-135M-Instruct, decoder-only, generates in
  evaluation) on a subset through ``launch/single_gpu.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import peak_flops  # noqa: E402  (benchmarks/ is not a package)

MFU_TARGET = 0.35
SEQ_LEN = 128

#: family -> finetune train arguments for the two-step bf16 check (small subsets, no evaluation during training)
BF16_RUNS: dict[str, list[str]] = {
    "glue_encoder": ["glue-mrpc"],
    "decoder_generation": ["summarization-scitldr"],
    "encoder_decoder_generation": [
        "summarization-scitldr", "--model_name_or_path", "sentence-transformers/all-MiniLM-L6-v2", "--gguf_file", "",
    ],
}
BF16_COMMON = ["--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "8",
               "--per_device_eval_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
               "--load_best_model_at_end", "false", "--bf16", "true", "--report_to", "none", "--disable_tqdm", "true"]


def launch_runs(out: Path) -> dict[str, list[str]]:
    """name -> command line of the accelerate-launched runs."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    mrpc = ["-m", "finetune", "train", "glue-mrpc", "--num_train_epochs", "1", "--disable_tqdm", "true"]
    return {
        "single_gpu": [*accelerate, "--config_file", "launch/single_gpu.yaml", *mrpc,
                       "--output_dir", str(out / "single_gpu")],
        "fsdp_one_process": [*accelerate, "--config_file", "launch/fsdp.yaml", "--num_processes", "1",
                             "--main_process_port", "0", *mrpc, "--output_dir", str(out / "fsdp_one_process")],
        "smollm2_generation": [*accelerate, "--config_file", "launch/single_gpu.yaml", "-m", "finetune", "train",
                               "summarization-scitldr", "--max_train_samples", "512", "--max_eval_samples", "64",
                               "--max_final_eval_samples", "64", "--disable_tqdm", "true",
                               "--output_dir", str(out / "smollm2_generation")],
    }


# ---------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------------------


def linear_parameters(model: Any) -> int:
    """Parameters that take part in matrix multiplications (Linear weights; biases are not multiplies)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(model: Any, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward): 6 x Linear parameters for the
    matmuls, plus 12 x layers x seq_len x hidden for attention scores (QK^T) and the weighted sum (AV)."""
    config = model.config
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size
    return 6 * linear_parameters(model) + attention


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    return flops_per_token * tokens_per_s / peak if peak else None


def measure_mfu(steps: int = 80, batch: int = 128, skip: int = 10, config: Any = None) -> dict[str, Any]:
    """BERT-base-sized sequence classifier, fixed 128-token batches, bf16 on GPU, Trainer; steady-state MFU."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    config = config or BertConfig(num_labels=2)  # bert-base-uncased: 12 layers, hidden 768, vocab 30522
    model = BertForSequenceClassification(config)
    cuda = torch.cuda.is_available()
    rows = batch * steps
    data = Dataset.from_dict({
        "input_ids": torch.randint(1000, config.vocab_size, (rows, SEQ_LEN)).tolist(),
        "attention_mask": [[1] * SEQ_LEN] * rows,
        "labels": torch.randint(0, 2, (rows,)).tolist(),
    })

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="gpu-check-mfu-"), per_device_train_batch_size=batch, max_steps=steps,
        bf16=cuda, optim="adamw_torch_fused", learning_rate=1e-4, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=2 if cuda else 0, dataloader_pin_memory=cuda,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    steady = clock.times[skip:]
    seconds = steady[-1] - steady[0]
    tokens_per_s = (len(steady) - 1) * batch * SEQ_LEN / seconds
    per_token = training_flops_per_token(model, SEQ_LEN)
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    value = mfu(per_token, tokens_per_s, peak)
    return {
        "model": f"BERT ({config.num_hidden_layers} layers, hidden {config.hidden_size}), sequence classification",
        "parameters": model.num_parameters(), "seq_len": SEQ_LEN, "batch": batch, "steps_timed": len(steady) - 1,
        "tokens_per_s": round(tokens_per_s), "flops_per_token": per_token, "peak_flops": peak, "mfu": value,
        "target": MFU_TARGET,
        "ok": value is not None and value >= MFU_TARGET,
    }


# ---------------------------------------------------------------------------------------------------------
# bf16 in effect, per family
# ---------------------------------------------------------------------------------------------------------


def check_bf16(family: str, out: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Two optimizer steps of `finetune train ... --bf16 true`; dtypes seen by hooks on the Linear layers."""
    import torch
    from transformers import TrainerCallback

    from finetune import callbacks, cli

    seen: dict[str, set[str]] = {"linear_outputs": set(), "trainable_weights": set()}

    class Dtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(lambda m, i, o: seen["linear_outputs"].add(str(o.dtype)))
            seen["trainable_weights"] |= {str(p.dtype) for p in model.parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    original = callbacks.default_callbacks
    callbacks.default_callbacks = lambda config: [*original(config), Dtypes()]
    args = BF16_RUNS[family]
    started = time.perf_counter()
    try:
        code = cli.main(["train", *args, *BF16_COMMON, *extra, "--output_dir", str(out / f"bf16-{family}")])
    finally:
        callbacks.default_callbacks = original
    ok = code == 0 and "torch.bfloat16" in seen["linear_outputs"] and seen["trainable_weights"] == {"torch.float32"}
    return {"exit_code": code, "linear_output_dtypes": sorted(seen["linear_outputs"]),
            "trainable_weight_dtypes": sorted(seen["trainable_weights"]),
            "seconds": round(time.perf_counter() - started, 1), "ok": ok}


# ---------------------------------------------------------------------------------------------------------
# accelerate-launched runs
# ---------------------------------------------------------------------------------------------------------


def run_launch(name: str, command: list[str], out: Path, timeout: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        code, tail = None, f"timed out after {timeout} s"
    run = out / name
    result: dict[str, Any] = {"exit_code": code, "seconds": round(time.perf_counter() - started, 1)}
    metrics_file = run / "metrics.json"
    if metrics_file.is_file():
        result["eval"] = json.loads(metrics_file.read_text()).get("eval", {})
    result["full_model"] = (run / "model.safetensors").is_file()
    ok = code == 0 and result["full_model"]
    if name == "fsdp_one_process":
        shards = sorted(str(p.relative_to(run)) for p in run.glob("checkpoint-*/pytorch_model_fsdp_0/*.distcp"))
        result["fsdp_shards"] = shards
        ok = ok and bool(shards)
    if not ok:
        result["log_tail"] = tail
    result["ok"] = ok
    return result


def plan(out: Path) -> dict[str, Any]:
    return {
        "bf16": {family: ["finetune", "train", *args, *BF16_COMMON] for family, args in BF16_RUNS.items()},
        "mfu": {"model": "BertConfig() (bert-base-uncased size)", "seq_len": SEQ_LEN, "target": MFU_TARGET},
        "launch": launch_runs(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="print the plan as JSON; needs no GPU")
    parser.add_argument("--json", default=None, help="also write the summary to this file")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--mfu_steps", type=int, default=80)
    opts = parser.parse_args(argv)
    out = Path(opts.out or tempfile.mkdtemp(prefix="gpu-check-"))
    if opts.dry_run:
        print(json.dumps(plan(out), indent=2))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU visible (torch.cuda.is_available() is False); "
              "use --dry_run to see the plan", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # the launch configs and recipes use paths relative to the repository root
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "platform": platform.platform(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    summary["bf16"] = {family: check_bf16(family, out) for family in BF16_RUNS}
    summary["mfu"] = measure_mfu(steps=opts.mfu_steps)
    for name, command in launch_runs(out).items():
        summary[name] = run_launch(name, command, out, timeout=150)
    checks = [*summary["bf16"].values(), summary["mfu"], *(summary[name] for name in launch_runs(out))]
    summary["ok"] = all(check["ok"] for check in checks)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2, default=str)
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
