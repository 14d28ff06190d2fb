"""Where one evaluation batch of a trained decoder goes: the loss forward, generate, and what generate could use.

Issue 24, item 4 (generation throughput) starts here. A decoder's evaluation batch runs two things: the
loss forward over prompt + target (teacher forcing, chunked loss) and ``generate`` from the prompt alone. This
times each on the longest ``--batch`` of the first 2 x ``--batch`` validation rows (the data as
``finetune evaluate RUN_DIR`` builds it), in the run's precision: the loss as evaluation computes it
(``GenerationTrainer.evaluation_loss``, chunked) and, for comparison, the Trainer's own loss step over the full
logits. Then the generate levers one at a time on the same prompts: the adapter merged into the weights
(peft's ``merge_adapter``), merged with a static KV cache and, where the CPU has bf16 units, a merged bf16
copy of the model without autocast, and that copy with a static KV cache.
Each generate arm is compared with today's (peft model, adapter unmerged) row by row.
``benchmarks/generation_throughput.py`` times whole evaluations side by side.

    FINETUNE_HUB_MIRROR=../shared/hub HF_HUB_OFFLINE=1 \
        python benchmarks/generation_phases.py RUN_DIR [--batch 32] [--json PATH]

RUN_DIR is a finished generation run with a LoRA adapter (docs/lora.md gives the SciTLDR command). The first
call of each kind also warms oneDNN's kernels, so the loss step and today's generate are timed twice.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def identical_rows(reference: torch.Tensor, other: torch.Tensor) -> int:
    """Rows of ``other`` equal to the reference's, token for token (the same length included)."""
    return sum(a == b for a, b in zip(reference.tolist(), other.tolist(), strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--batch", type=int, default=32, help="rows of the batch (the training run's eval batch)")
    parser.add_argument("--json", default="benchmarks/results/generation_phases.json")
    opts = parser.parse_args(argv)

    from finetune import cli, pipeline
    from finetune.generation.trainer import left_padded_prompts
    from finetune.precision import cpu_bf16_unit, cpu_flags

    config, _ = cli.inference_config([opts.run_dir, "--max_final_eval_samples", str(opts.batch * 2)], "bench")
    task, trainer, _, tokenized = pipeline.load_for_inference(config)
    rows = tokenized["validation"]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))[: opts.batch]
    batch = trainer.data_collator([{k: rows[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in order])
    model = trainer.model.eval()
    prompt_ids, prompt_mask = left_padded_prompts(
        batch["input_ids"], batch["attention_mask"], batch["labels"], model.generation_config.pad_token_id
    )
    load_before = os.getloadavg()
    seconds: dict[str, float] = {}
    autocast = trainer.accelerator.autocast  # the run's precision, as evaluation uses it (fp32: no autocast)
    with torch.no_grad():
        # What evaluation runs: the loss from the hidden states in chunks (GenerationTrainer.evaluation_loss).
        for name in ("loss_step_first", "loss_step"):
            seconds[name], _ = timed(lambda: trainer.evaluation_loss(model, batch))
        # The Trainer's own loss step, full logits: what the first version of this script timed as "loss step".
        seconds["loss_step_full_logits"], _ = timed(lambda: trainer.prediction_step(model, batch, True))
        with autocast():
            seconds["prefill"], _ = timed(
                lambda: model(input_ids=prompt_ids, attention_mask=prompt_mask, logits_to_keep=1))
            for name in ("generate_today_first", "generate_today"):
                seconds[name], today = timed(lambda: model.generate(input_ids=prompt_ids, attention_mask=prompt_mask))
        model.merge_adapter()
        with autocast():
            seconds["generate_merged"], merged = timed(
                lambda: model.generate(input_ids=prompt_ids, attention_mask=prompt_mask))
            seconds["generate_merged_static"], merged_static = timed(lambda: model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, cache_implementation="static"))
        identical = {"merged": identical_rows(today, merged),
                     "merged_static": identical_rows(today, merged_static)}
        if cpu_bf16_unit(cpu_flags()) is not None:  # without bf16 units oneDNN emulates it: minutes, no news
            bf16 = copy.deepcopy(model.get_base_model()).to(torch.bfloat16)
            seconds["generate_merged_bf16"], merged_bf16 = timed(
                lambda: bf16.generate(input_ids=prompt_ids, attention_mask=prompt_mask))
            seconds["generate_merged_bf16_static"], static = timed(
                lambda: bf16.generate(input_ids=prompt_ids, attention_mask=prompt_mask, cache_implementation="static"))
            identical.update(merged_bf16=identical_rows(today, merged_bf16),
                             merged_bf16_static=identical_rows(today, static))
        model.unmerge_adapter()
    result = {
        "command": "python benchmarks/generation_phases.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "batch": {"rows": opts.batch, "prompt_shape": list(prompt_ids.shape),
                  "loss_forward_shape": list(batch["input_ids"].shape), "generated_shape": list(today.shape)},
        "seconds": seconds,
        "precision": "bf16" if trainer.args.bf16 else "fp32",
        "rows_identical_to_today": identical,
    }
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"], indent=2), json.dumps(result["rows_identical_to_today"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
