"""Evaluation-time generation: length-sorted batches against batches in dataset order.

``finetune``'s generation tasks generate for an evaluation split longest-first (similar lengths share a
batch, so prompts carry less padding) and put the predictions back in order. This measures what sorting
buys, with ``transformers``' ``generate`` on the real SciTLDR validation abstracts (from the mirror):

    FINETUNE_HUB_MIRROR=../shared/hub python benchmarks/generation_batching.py

The model is a small random-weight Llama built from a config (no decoder checkpoint small enough for a
2-core CPU is in the mirror), so it never emits EOS by design: every prompt generates exactly
``--new_tokens`` tokens, and the measured difference is the prompt padding alone. With a trained model,
sequences of a sorted batch also tend to finish together, which this does not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def scitldr_prompts(limit: int) -> list[str]:
    from datasets import load_dataset

    from finetune import mirror

    path = mirror.resolve("allenai/scitldr", "datasets")
    rows = load_dataset(path, "Abstract", split="validation").select(range(limit))
    return ["Summarize: " + " ".join(source) + "\nSummary:" for source in rows["source"]]


def tiny_llama(vocab_size: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=pad_id, bos_token_id=pad_id,
        eos_token_id=pad_id,
    )
    return LlamaForCausalLM(config).eval()


def generate_all(model, tokenizer, prompts: list[str], order: list[int], batch: int, new_tokens: int) -> dict:
    """Generate for every prompt in ``order``; wall time, padded prompt tokens and generated tokens."""
    padded = generated = 0
    start = time.perf_counter()
    for s in range(0, len(order), batch):
        texts = [prompts[i] for i in order[s : s + batch]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512,
                           return_token_type_ids=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        padded += int(inputs["input_ids"].numel())
        generated += int(out[:, inputs["input_ids"].shape[1]:].numel())
    wall = time.perf_counter() - start
    return {"wall_s": wall, "generated_tokens_per_s": generated / wall, "prompt_tokens_padded": padded,
            "examples_per_s": len(order) / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/generation_batching.json")
    opts = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from finetune import mirror

    tokenizer = AutoTokenizer.from_pretrained(mirror.resolve("sentence-transformers/all-MiniLM-L6-v2", "models"))
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    prompts = scitldr_prompts(opts.examples)
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=512)["input_ids"]]
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
    orders = {"dataset_order": list(range(len(prompts))),
              "longest_first": [int(i) for i in np.argsort([-n for n in lengths], kind="stable")]}
    generate_all(model, tokenizer, prompts, orders["dataset_order"][: opts.batch], opts.batch, 2)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in orders}
    for _ in range(opts.rounds):
        for name, order in orders.items():  # alternated, so load drift falls on both
            runs[name].append(generate_all(model, tokenizer, prompts, order, opts.batch, opts.new_tokens))
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in runs.items()
    }
    real = sum(lengths)
    for row in summary.values():
        row["prompt_padding_fraction"] = 1 - real / row["prompt_tokens_padded"]
    ratio = summary["longest_first"]["generated_tokens_per_s"] / summary["dataset_order"]["generated_tokens_per_s"]
    report = {"command": "python benchmarks/generation_batching.py " + " ".join(argv or sys.argv[1:]),
              "settings": vars(opts), "load_average": os.getloadavg(), "summary": summary,
              "sorted_over_unsorted_generated_tokens_per_s": ratio, "runs": runs}
    print("| order | eval wall s | generated tokens/s | prompt padding |\n|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['wall_s']:.1f} | {row['generated_tokens_per_s']:.1f} | "
              f"{row['prompt_padding_fraction']:.1%} |")
    print(f"longest-first / dataset order: {ratio:.2f}x generated tokens/s")
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
