"""Evaluation under bf16 autocast holds frozen Linear weights in bf16 instead of casting them at every forward.

``finetune.precision.frozen_linear_weights_in``: autocast caches its bf16 copy only of weights that require a
gradient, so a LoRA base (or a loaded adapter run, all frozen) was cast again for every generated token. The
change must leave the evaluation's loss and greedy outputs bit for bit as they were, on every generation kind,
and must put the original fp32 parameters (and the tied embedding) back afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_shared_prompt import evaluation_trainer


def linear_weight_dtypes(model: torch.nn.Module) -> tuple[list[torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    """The dtype of every nn.Linear weight each time a forward reads it."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
             for m in model.modules() if type(m) is torch.nn.Linear]
    return seen, hooks


@pytest.mark.parametrize(("arch", "extra", "frozen_all"), [
    pytest.param("llama", ["--use_peft", "true"], False, id="llama-lora"),  # training's final evaluation
    pytest.param("llama", ["--use_peft", "true"], True, id="llama-loaded-adapter"),  # finetune evaluate: all frozen
    pytest.param("gpt2", ["--use_peft", "true"], False, id="gpt2-lora"),  # Conv1D base: left alone
    pytest.param("t5", ["--use_peft", "true"], False, id="t5-lora"),  # encoder-decoder, Seq2SeqTrainer's step
    pytest.param("llama", [], False, id="llama-full"),  # nothing frozen: nothing to do
])
def test_bf16_weights_give_autocasts_outputs_exactly(arch, extra, frozen_all, tiny_model_dir, tmp_path: Path) -> None:
    trainer, _ = evaluation_trainer(arch, tiny_model_dir, tmp_path, "--bf16", "true", *extra)
    if frozen_all:
        trainer.model.requires_grad_(False)
    before = {name: param for name, param in trainer.model.named_parameters()}
    embedding = trainer.model.get_input_embeddings().weight
    runs = {}
    for in_bf16 in (False, True):
        trainer.frozen_weights_in_bf16 = in_bf16
        seen, hooks = linear_weight_dtypes(trainer.model)
        try:
            runs[in_bf16] = trainer.predict(trainer.eval_dataset)
        finally:
            for hook in hooks:
                hook.remove()
        runs[in_bf16, "dtypes"] = set(seen)
    frozen_linears = any(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in trainer.model.modules())
    assert runs[False, "dtypes"] <= {torch.float32}
    assert (torch.bfloat16 in runs[True, "dtypes"]) == frozen_linears  # it ran on the bf16 copies where frozen
    assert frozen_linears == (frozen_all or "--use_peft" in extra)  # LoRA's base (GPT-2: its lm_head only)
    assert runs[True].metrics["test_loss"] == runs[False].metrics["test_loss"]
    assert (runs[True].predictions == runs[False].predictions).all()
    after = dict(trainer.model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same objects
    assert all(p.dtype == torch.float32 for p in after.values())
    assert trainer.model.get_input_embeddings().weight is embedding
    output = trainer.model.get_output_embeddings()
    if getattr(trainer.model.config, "tie_word_embeddings", False) and output is not None:
        assert output.weight is embedding  # the tie holds again


def test_fp32_evaluation_changes_nothing(tiny_model_dir, tmp_path: Path) -> None:
    trainer, _ = evaluation_trainer("llama", tiny_model_dir, tmp_path, "--bf16", "false", "--use_peft", "true")
    assert trainer.evaluation_weight_dtype() is None
    seen, hooks = linear_weight_dtypes(trainer.model)
    try:
        trainer.evaluate()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {torch.float32}
