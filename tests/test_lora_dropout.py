"""LoRA's input dropout keeps a bool mask for the backward, not float noise (issue 24.1).

peft's ``nn.Dropout`` on a CPU keeps a float32 noise tensor per adapted layer for the backward; finetune swaps
it for ``finetune.lora_dropout.MaskDropout`` (``torch.native_dropout``: the same Bernoulli mask and 1 / (1 - p)
scale, kept as bool). Checked on what autograd saves, on the drawn masks and on the real training path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_precision import family_argv
from torch import nn

from finetune import pipeline
from finetune.config import parse_run_config
from finetune.lora_dropout import MaskDropout, with_mask_dropout

LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[torch.dtype, int]:
    """Bytes of the distinct tensors (not parameters) autograd keeps for the backward of one forward, per dtype."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[torch.dtype, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = (tensor.dtype, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    totals: dict[torch.dtype, int] = {}
    for dtype, size in seen.values():
        totals[dtype] = totals.get(dtype, 0) + size
    return totals


def lora_dropouts(model: nn.Module) -> list[nn.Module]:
    """The modules peft applies to each adapted layer's input (``<layer>.lora_dropout.<adapter name>``)."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["lora_dropout"]]


def dropout_input_elements(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Elements entering LoRA dropouts in one forward, where the backward reaches them.

    The first block's input comes from the frozen embedding, so nothing is kept for the dropouts there.
    """
    counted = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: counted.append(args[0].numel() * args[0].requires_grad))
             for m in lora_dropouts(model)]
    model(**batch)
    for hook in hooks:
        hook.remove()
    return sum(counted)


def prepared_lora(arch: str, tiny_model_dir, out: Path, dropout: str = "0.1"):
    argv = [*family_argv("summarization", tiny_model_dir(arch), out), *LORA, "--lora_dropout", dropout,
            "--bf16", "false"]
    return pipeline.prepare_training(parse_run_config(None, argv))


def a_batch(run) -> dict[str, torch.Tensor]:
    rows = [run.tokenized["train"][i] for i in range(3)]
    return run.trainer.data_collator(rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_lora_dropout_keeps_a_bool_mask_instead_of_float_noise(arch: str, tiny_model_dir, tmp_path: Path):
    run = prepared_lora(arch, tiny_model_dir, tmp_path)
    model = run.trainer.model.train()
    dropouts = lora_dropouts(model)
    assert dropouts and all(type(m) is MaskDropout for m in dropouts)
    batch = a_batch(run)
    elements = dropout_input_elements(model, batch)
    assert elements > 0
    torch.manual_seed(0)
    masked = saved_bytes(model, batch)
    for parent in model.modules():  # back to peft's own nn.Dropout, for the comparison
        if isinstance(getattr(parent, "lora_dropout", None), nn.ModuleDict):
            for key, module in parent.lora_dropout.items():
                parent.lora_dropout[key] = nn.Dropout(module.p)
    torch.manual_seed(0)
    noise = saved_bytes(model, batch)
    # Per element that enters a dropout: 4 bytes of fp32 noise before, a 1-byte bool mask now.
    assert masked.get(torch.bool, 0) - noise.get(torch.bool, 0) == elements
    assert noise[torch.float32] - masked[torch.float32] == 4 * elements


def test_mask_dropout_draws_bernoulli_masks_scaled_like_nn_dropout() -> None:
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    dropout = MaskDropout(0.25).train()
    y = dropout(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.005)
    assert torch.all(y[kept] == 1 / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)  # the gradient goes through the same mask and scale
    assert dropout.eval()(x) is x
    assert torch.equal(MaskDropout(1.0).train()(x), torch.zeros_like(x))


def test_only_real_dropouts_are_swapped(tiny_model_dir, tmp_path: Path) -> None:
    """lora_dropout 0: peft puts nn.Identity there, which keeps nothing and stays."""
    run = prepared_lora("llama", tiny_model_dir, tmp_path, dropout="0")
    model = run.trainer.model
    assert with_mask_dropout(model) == 0
    assert lora_dropouts(model) and all(type(m) is nn.Identity for m in lora_dropouts(model))


def test_training_with_mask_dropout_moves_the_adapter(tiny_model_dir, tmp_path: Path) -> None:
    run = prepared_lora("llama", tiny_model_dir, tmp_path)
    model = run.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    run.trainer.args.max_steps = 3
    result = run.trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved == list(before)  # lora_B starts at zero: every one has trained
