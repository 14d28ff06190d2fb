"""``--gradient_checkpointing true`` for every family, with and without LoRA, and with resume (issue 24.3).

Checkpointing trades memory for compute: each transformer block's activations are dropped after its forward
and recomputed in the backward. So a checkpointed run calls every block twice per micro-batch and must end at
the same weights as the run without it (the recompute replays the dropout masks: torch's checkpoint keeps
the RNG state). With LoRA the frozen embeddings give the first block an input without gradients, which peft
and transformers fix with ``enable_input_require_grads``; without it the adapters would get no gradient and
the weights would not move, which the comparison with the plain run would show.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import read_json
from test_fault_tolerance import step_losses
from test_precision import family_argv
from transformers.modeling_layers import GradientCheckpointingLayer

from finetune import pipeline
from finetune.config import parse_run_config

LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
STEPS = ["--max_steps", "3", "--learning_rate", "5e-3"]


def trained(argv: list[str]) -> tuple[dict[str, torch.Tensor], int, bool]:
    """(trainable weights after training, training-mode calls of a layer in the first block, checkpointing on)."""
    run = pipeline.prepare_training(parse_run_config(None, argv))
    block = next(m for m in run.trainer.model.modules() if isinstance(m, GradientCheckpointingLayer))
    # A Linear inside the first block: transformers checkpoints the block's forward, not its __call__, so the
    # block's own hooks run once; the modules inside it run again when the backward recomputes it.
    inner = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
    calls = Counter()
    hook = inner.register_forward_hook(lambda module, *_: calls.update([module.training]))
    initial = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    try:
        run.trainer.train()
    finally:
        hook.remove()
    weights = {n: p.detach().clone() for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(weights[n], initial[n]) for n in weights)  # training moved something
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in run.trainer.model.modules())
    return weights, calls[True], checkpointing


@pytest.mark.parametrize("family, arch, extra", [
    ("glue", "bert", []),
    ("glue", "distilbert", LORA),  # an encoder without token_type_ids, with LoRA
    ("summarization", "llama", []),  # decoder-only
    ("summarization", "llama", LORA),
    ("summarization", "gpt2", LORA),
    ("summarization", "t5", LORA),  # encoder-decoder
], ids=["bert", "distilbert-lora", "llama", "llama-lora", "gpt2-lora", "t5-lora"])
def test_checkpointed_run_recomputes_each_block_and_ends_at_the_same_weights(
    family: str, arch: str, extra: list[str], tiny_model_dir, tmp_path: Path
) -> None:
    argv = [*family_argv(family, tiny_model_dir(arch), tmp_path / "plain"), *extra, *STEPS]
    plain, plain_calls, plain_on = trained(argv)
    argv = [*family_argv(family, tiny_model_dir(arch), tmp_path / "gc"), *extra, *STEPS]
    checkpointed, gc_calls, gc_on = trained([*argv, "--gradient_checkpointing", "true"])
    assert not plain_on and gc_on
    assert plain_calls == 3 and gc_calls == 2 * plain_calls  # one forward, one recompute per step
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointed_lora_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path: Path) -> None:
    """A run resumed from its step-2 checkpoint (checkpointing and LoRA on) ends where the whole run ended."""
    from safetensors.torch import load_file

    from finetune.cli import main

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    settings = [*LORA, "--max_steps", "4", "--learning_rate", "5e-3", "--gradient_checkpointing", "true",
                "--eval_strategy", "no", "--load_best_model_at_end", "false",
                "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1"]
    assert main(["train", *family_argv("summarization", tiny_model_dir("llama"), whole), *settings]) == 0
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    # A marker only a resumed run carries on: the checkpoint's logged step-2 loss, changed.
    state_file = resumed / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    next(e for e in state["log_history"] if e.get("step") == 2 and "loss" in e)["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    argv = family_argv("summarization", tiny_model_dir("llama"), resumed)
    assert main(["train", *argv, *settings, "--resume_from_checkpoint", "last"]) == 0
    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in (whole, resumed))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)
    expected, seen = step_losses(whole), step_losses(resumed)
    assert seen[2] == 123.0 and sorted(seen) == [1, 2, 3, 4]  # resumed at step 2, not trained from the start
    assert seen[3] == pytest.approx(expected[3], rel=1e-6) and seen[4] == pytest.approx(expected[4], rel=1e-6)
    assert read_json(resumed / "metrics.json")["train"]["train_loss"] > 0
