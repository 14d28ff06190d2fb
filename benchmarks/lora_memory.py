"""What the autograd graph of one SmolLM2-135M training step keeps, full fine-tuning vs LoRA: where LoRA's memory goes.

Loads the dequantised SmolLM2 copy that `finetune` caches (run any SmolLM2 GGUF recipe once first), then for one
arm runs a forward pass on a random batch (4 x 448 tokens: SciTLDR's prompt + target length) under the run's
precision (bf16 autocast where the CPU has bf16 units, as finetune decides) and counts, with
``torch.autograd.graph.saved_tensors_hooks``, the distinct tensors autograd keeps for the backward, by the module
that saved them and by dtype (parameters excluded: they exist anyway). Then the backward, and the process's RSS
and peak RSS after each stage. One arm per process, so that peaks are its own:

    for arm in full lora lora_mask_dropout lora_nn_dropout lora0; do python benchmarks/lora_memory.py $arm; done

``--steps N`` repeats forward + backward N times (the graph counted in the first) and times each: whether the
process's memory is reused from step to step. The malloc the process runs with is its environment's, recorded
with the figures (``LD_PRELOAD=.../libtcmalloc_minimal.so.4``, ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N``,
``THP_MEM_ALLOC_ENABLE=1``): BENCHMARKS.md 'Which malloc' ran every arm under each with ``--steps 3``.

Arms: ``full`` (every weight trains), ``lora`` (r 16, all-linear, dropout 0.05, set up as finetune does:
``adapters.with_new_adapter``, the dropout inside lora_A), ``lora_mask_dropout`` (a ``MaskDropout`` module before
a plain lora_A: finetune before that), ``lora_nn_dropout`` (peft's own ``nn.Dropout``: finetune before both),
``lora0`` (dropout 0). The loss is the model's own (full logits): it is the same for every
arm, and finetune's chunked loss (finetune.generation.chunked_loss) removes it from all of them alike.
Not a test; no optimizer step (AdamW state and gradients add 1.6 GB to the full arm only).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import resource
import sys
import time
from contextlib import nullcontext

import psutil
import torch
from torch import nn


def rss_mb() -> tuple[float, float]:
    rss = psutil.Process().memory_info().rss / 2**20
    return rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def smollm2_path() -> str:
    cache = os.environ.get("FINETUNE_CACHE", os.path.expanduser("~/.cache/finetune"))
    found = [p for p in sorted(glob.glob(f"{cache}/gguf/*SmolLM2-135M*")) if not p.endswith(".lock")]
    if not found:
        sys.exit("no dequantised SmolLM2 in the finetune cache: run a SmolLM2 GGUF recipe once first")
    return found[0]


def with_lora(model: nn.Module, dropout: float, layout: str) -> nn.Module:
    """The adapter as finetune sets it up (adapters.with_new_adapter), or with an earlier dropout layout put back.

    ``layout``: ``finetune`` (the dropout inside lora_A: ``DroppedInputLinear``), ``mask`` (a ``MaskDropout``
    module before a plain lora_A: finetune before that) or ``nn`` (peft's own ``nn.Dropout``: before both).
    """
    from finetune import adapters
    from finetune.config import PeftSettings
    from finetune.lora_dropout import DroppedInputLinear, MaskDropout

    settings = PeftSettings(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=dropout,
                            lora_target_modules=["all-linear"])
    wrapped = adapters.with_new_adapter(model, settings, "HuggingFaceTB/SmolLM2-135M-Instruct")
    if layout == "finetune":
        return wrapped
    for module in wrapped.modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            for name, a_matrix in module.lora_A.items():
                if isinstance(a_matrix, DroppedInputLinear):
                    plain = nn.Linear(a_matrix.in_features, a_matrix.out_features, bias=False, device="meta")
                    plain.weight = a_matrix.weight
                    module.lora_A[name] = plain
                    module.lora_dropout[name] = nn.Dropout(a_matrix.p)
                dropped = module.lora_dropout[name]
                if isinstance(dropped, nn.Dropout):
                    module.lora_dropout[name] = (MaskDropout if layout == "mask" else nn.Dropout)(dropped.p)
    return wrapped


def module_stack(model: nn.Module) -> list[str]:
    """A stack of the class names of the modules whose forward is running (hooks keep it)."""
    stack: list[str] = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda mod, args: stack.append(type(mod).__name__))
        module.register_forward_hook(lambda mod, args, out: None if stack.pop() else None)  # None: output kept
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arm", choices=["full", "lora", "lora_mask_dropout", "lora_nn_dropout", "lora0"])
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                        help="bf16 autocast: auto = where the CPU has bf16 units, as finetune decides; the graph's "
                             "sizes do not depend on the host, so true measures bf16 runs' memory anywhere")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=448)
    parser.add_argument("--steps", type=int, default=1,
                        help="forward + backward passes (the graph is counted in the first); later ones show whether "
                             "the process's memory grows or is reused from step to step")
    parser.add_argument("--json", help="append this arm's figures to this JSON-lines file")
    opts = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from finetune import precision

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    if opts.arm != "full":
        layout = {"lora_nn_dropout": "nn", "lora_mask_dropout": "mask"}.get(opts.arm, "finetune")
        model = with_lora(model, 0.0 if opts.arm == "lora0" else 0.05, layout)
    model.train()
    stack = module_stack(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[str, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved:
            where = stack[-1] if stack else "(loss)"
            saved[storage.data_ptr()] = (f"{where} {str(tensor.dtype).removeprefix('torch.')}", storage.nbytes())
        return tensor

    bf16 = (precision.cpu_bf16_unit(precision.cpu_flags()) is not None if opts.bf16 == "auto"
            else opts.bf16 == "true")
    ids = torch.randint(0, model.config.vocab_size, (opts.rows, opts.length))
    figures: dict = {"arm": opts.arm, "batch": [opts.rows, opts.length], "bf16_autocast": bf16,
                     "loaded": rss_mb()}
    # The allocator the process runs with is chosen before it starts (LD_PRELOAD, glibc tunables, PyTorch's THP).
    figures["malloc"] = {name: os.environ[name] for name in ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")
                         if name in os.environ}
    figures["steps"] = []
    for step in range(opts.steps):
        began = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor) if step == 0 else nullcontext()
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        forward = rss_mb()
        middle = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=True)
        figures["steps"].append({"forward": forward, "backward": rss_mb(), "forward_s": round(middle - began, 2),
                                 "backward_s": round(time.perf_counter() - middle, 2)})
        del loss
    figures["forward"], figures["backward"] = figures["steps"][0]["forward"], figures["steps"][0]["backward"]
    by_kind: collections.Counter = collections.Counter()
    for kind, size in saved.values():
        by_kind[kind] += size
    figures["saved_mb"] = round(sum(by_kind.values()) / 2**20, 1)
    figures["saved_by_module_mb"] = {k: round(v / 2**20, 1) for k, v in by_kind.most_common()}
    print(f"{opts.arm}: autograd keeps {figures['saved_mb']:.0f} MB for the backward "
          f"(bf16 autocast {bf16}; batch {opts.rows} x {opts.length})")
    for kind, size in list(figures["saved_by_module_mb"].items())[:8]:
        print(f"  {kind:28s} {size:8.1f} MB")
    print(f"  after loading   rss {figures['loaded'][0]:6.0f} MB  peak {figures['loaded'][1]:6.0f} MB")
    for step, stages in enumerate(figures["steps"], 1):
        for stage in ("forward", "backward"):
            print(f"  step {step} {stage:9s} rss {stages[stage][0]:6.0f} MB  peak {stages[stage][1]:6.0f} MB  "
                  f"{stages[stage + '_s']:6.1f} s")
    if opts.json:
        with open(opts.json, "a") as handle:
            handle.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
