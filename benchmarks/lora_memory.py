"""Resident memory of one SmolLM2-135M training step, full vs LoRA (dropout 0.05 and 0): where LoRA's extra goes.

Loads the dequantised SmolLM2 copy that `finetune` caches (run any SmolLM2 GGUF recipe once first), then
for one arm runs a forward and a backward pass on a random batch (4 x 256 tokens) and prints the process's
RSS and peak RSS after each stage. One arm per process, so that peaks are its own:

    for arm in full lora lora0; do python benchmarks/lora_memory.py $arm; done

Not a test; no optimizer step (AdamW state would add 1.1 GB to the full arm only).
"""

from __future__ import annotations

import glob
import os
import resource
import sys

import psutil
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def report(stage: str) -> None:
    rss = psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{sys.argv[1]:5s} {stage:13s} rss {rss:6.0f} MB  peak {peak:6.0f} MB", flush=True)


def main() -> None:
    arm = sys.argv[1]
    cache = os.environ.get("FINETUNE_CACHE", os.path.expanduser("~/.cache/finetune"))
    path = next(p for p in sorted(glob.glob(f"{cache}/gguf/*SmolLM2-135M*")) if not p.endswith(".lock"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    report("loaded")
    if arm in ("lora", "lora0"):
        config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear",
                            lora_dropout=0.05 if arm == "lora" else 0.0)
        model = get_peft_model(model, config)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 256))
    loss = model(input_ids=ids, labels=ids).loss
    report("forward")
    loss.backward()
    report("backward")


if __name__ == "__main__":
    main()
