"""What LoRA's input dropout keeps for the backward (issue 24.1).

Plain LoRA layers: the dropout moves into the A matrix (``DroppedInputLinear``), whose backward keeps the input
itself and a seed, so that a graph with dropout keeps exactly what one without it keeps. DoRA (which uses the
dropped input elsewhere too): peft's ``nn.Dropout``, which keeps float32 noise on a CPU, becomes ``MaskDropout``
(``torch.native_dropout``: the same Bernoulli mask and 1 / (1 - p) scale, kept as bool). Checked on what
autograd saves, on the drawn masks and gradients, and on the real training path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_precision import family_argv
from torch import nn

from finetune import pipeline
from finetune.config import parse_run_config
from finetune.lora_dropout import (
    DroppedInputLinear,
    MaskDropout,
    draw_seed,
    kept_mask,
    with_dropout_in_lora_a,
    with_mask_dropout,
)

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


def prepared_lora(arch: str, tiny_model_dir, out: Path, dropout: str = "0.1", *extra: str):
    argv = [*family_argv("summarization", tiny_model_dir(arch), out), *LORA, "--lora_dropout", dropout,
            "--bf16", "false", *extra]
    return pipeline.prepare_training(parse_run_config(None, argv))


def a_batch(run) -> dict[str, torch.Tensor]:
    rows = [run.tokenized["train"][i] for i in range(3)]
    return run.trainer.data_collator(rows)


def a_matrices(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["lora_A"]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: peft's Linear over Conv1D (fan_in_fan_out)
def test_with_dropout_lora_keeps_exactly_what_it_keeps_without(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    run = prepared_lora(arch, tiny_model_dir, tmp_path)
    model = run.trainer.model.train()
    moved = a_matrices(model)
    assert moved and all(type(m) is DroppedInputLinear and m.p == 0.1 for m in moved)
    assert all(type(m) is nn.Identity for m in lora_dropouts(model))  # the dropout is inside lora_A now
    batch = a_batch(run)
    torch.manual_seed(0)
    with_dropout = saved_bytes(model, batch)
    for module in moved:
        module.p = 0.0
    without = saved_bytes(model, batch)
    assert with_dropout == without
    for parent in model.modules():  # peft's own layout: nn.Dropout before a plain lora_A, as MaskDropout
        if isinstance(getattr(parent, "lora_A", None), nn.ModuleDict):
            for key, module in parent.lora_A.items():
                parent.lora_A[key] = nn.Linear(module.in_features, module.out_features, bias=False)
                parent.lora_A[key].weight = module.weight
                parent.lora_dropout[key] = MaskDropout(0.1)
    torch.manual_seed(0)
    separate = saved_bytes(model, batch)
    # Each layer kept its own dropped copy and a bool mask. Llama's q, k, v (and gate, up) read one input, which
    # the fused layers keep once: fewer float bytes. GPT-2's fused c_attn and its c_fc read an input each alone.
    extra_floats = separate[torch.float32] - with_dropout[torch.float32]
    assert extra_floats > 0 if arch == "llama" else extra_floats == 0
    assert separate[torch.bool] - with_dropout.get(torch.bool, 0) == dropout_input_elements(model, batch)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_dropped_input_linear_is_dropout_then_linear(autocast: bool) -> None:
    """Output and both gradients equal those of ``linear(x * mask / (1 - p))`` through autograd, same mask."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 6, bias=False)
    x = torch.randn(3, 50, 24, requires_grad=True)
    grad = torch.randn(3, 50, 6)
    layer = DroppedInputLinear(linear, 0.25).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(7)
        fused = layer(x)
    fused.backward(grad.to(fused.dtype))
    fused_grads = x.grad.clone(), linear.weight.grad.clone()
    x.grad = linear.weight.grad = None
    torch.manual_seed(7)
    keep = kept_mask(x.shape, 0.25, draw_seed(), x.device)
    assert keep.float().mean().item() == pytest.approx(0.75, abs=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = linear(x * keep * (1 / 0.75))
    reference.backward(grad.to(reference.dtype))
    assert fused.dtype == reference.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(fused, reference, rtol=0, atol=0)
    torch.testing.assert_close(fused_grads[0], x.grad)
    torch.testing.assert_close(fused_grads[1], linear.weight.grad)
    assert torch.equal(fused_grads[0] == 0, ~keep)  # dropped elements get no gradient
    assert layer.eval()(x).equal(linear(x))


def test_dora_keeps_a_bool_mask_instead_of_float_noise(tiny_model_dir, tmp_path: Path) -> None:
    """DoRA uses the dropped input beyond lora_A: its dropout stays a module, a MaskDropout."""
    arch = "llama"
    run = prepared_lora(arch, tiny_model_dir, tmp_path, "0.1", "--use_dora", "true")
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
    # DoRA frees some tensors it saved (its weight-norm branch), whose storages can be reused: the float
    # difference is 4 bytes per element up to that reuse (a few percent, run to run).
    assert noise[torch.float32] - masked[torch.float32] == pytest.approx(4 * elements, rel=0.05)


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
    assert with_mask_dropout(model) == 0 and with_dropout_in_lora_a(model) == 0
    assert all(type(m) is nn.Linear for m in a_matrices(model))
    assert lora_dropouts(model) and all(type(m) is nn.Identity for m in lora_dropouts(model))


def test_training_with_lora_dropout_moves_the_adapter(tiny_model_dir, tmp_path: Path) -> None:
    run = prepared_lora("llama", tiny_model_dir, tmp_path)
    model = run.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    run.trainer.args.max_steps = 3
    result = run.trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved == list(before)  # lora_B starts at zero: every one has trained


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_kept_mask_is_bernoulli_of_the_rounded_p_and_repeats_per_seed(p: float) -> None:
    """The mask comes from 16-bit slices of 64-bit draws (4x fewer than bernoulli_): each element kept with
    probability 1 - p (p rounded to 1/65536), independently of its neighbours, the same for the same seed."""
    from finetune.lora_dropout import dropped_levels, keep_scale

    shape = torch.Size((7, 101, 289))  # 204,323 elements: not a multiple of 4
    mask = kept_mask(shape, p, 1234, torch.device("cpu"))
    assert mask.shape == shape and mask.dtype == torch.bool
    assert torch.equal(mask, kept_mask(shape, p, 1234, torch.device("cpu")))
    assert not torch.equal(mask, kept_mask(shape, p, 1235, torch.device("cpu")))
    kept = 1 - dropped_levels(p) / 65536
    assert abs(kept - (1 - p)) <= 1 / 65536
    sigma = (kept * (1 - kept) / mask.numel()) ** 0.5
    assert abs(mask.float().mean().item() - kept) < 5 * sigma
    flat = mask.flatten().float()
    # neighbours (same 64-bit draw or not) are independent: P(both kept) = kept^2
    for lag in (1, 2, 3, 4):
        assert abs((flat[:-lag] * flat[lag:]).mean().item() - kept**2) < 5 * sigma
    assert keep_scale(p) * kept == pytest.approx(1, abs=1e-12)  # the dropped input's expectation is the input
