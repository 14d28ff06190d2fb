"""LoRA's input dropout, set up so that the backward keeps little for it (issue 24.1).

peft applies ``nn.Dropout`` to the input of every adapted layer (210 of them in SmolLM2: 7 per block) and feeds
the dropped copy to the A matrix. Two costs for the backward, per adapted layer, measured with
``torch.autograd.graph.saved_tensors_hooks`` on SmolLM2 (BENCHMARKS.md 'Decoder memory and QLoRA'):

* on a CPU ``torch.nn.functional.dropout`` computes ``input * noise`` and keeps the float noise (4 bytes per input
  element, fp32 even under bf16 autocast): :class:`MaskDropout` (``torch.native_dropout``, the same Bernoulli
  mask and 1 / (1 - p) scale) keeps a bool mask instead;
* lora_A keeps the dropped copy for its weight gradient, one per layer, where without dropout the layers that read
  the same input (q, k, v; gate, up) share it: :class:`DroppedInputLinear` computes ``lora_A(dropout(x))`` as one
  step whose backward keeps ``x`` and the mask's seed, and draws the mask again.

:func:`with_dropout_in_lora_a` applies the second to plain LoRA Linear layers; :func:`with_mask_dropout` the
first to what remains (DoRA and the other variants, which use the dropped input elsewhere as well).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` whose backward keeps a bool mask (``torch.native_dropout``) rather than float noise."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return input
        if self.p == 1:  # native_dropout divides by 1 - p
            return torch.zeros_like(input)
        return torch.native_dropout(input, self.p, True)[0]


def with_mask_dropout(model: nn.Module) -> int:
    """Swap every peft LoRA input dropout of ``model`` for :class:`MaskDropout`, in place; how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:  # nn.Identity where lora_dropout is 0: nothing to keep
                dropouts[name] = MaskDropout(dropout.p)
                swapped += 1
    return swapped


def draw_seed() -> int:
    """A seed for one dropout mask, from torch's global generator.

    Drawn from the global generator so that ``torch.manual_seed`` (the Trainer's seed) fixes every mask, resumed
    runs draw what the uninterrupted run drew (the Trainer restores the generator), and gradient checkpointing,
    which restores the generator before it recomputes a forward, draws the same mask again.
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


#: a mask element is a 16-bit slice of the generator's 64-bit draws: p is rounded to a multiple of 1/65536
MASK_LEVELS = 2**16


def dropped_levels(p: float) -> int:
    """How many of the 65536 levels of a mask element drop it: p rounded (0.05 -> 3277, p 0.0500031), within (0, 1)."""
    return min(max(round(p * MASK_LEVELS), 1), MASK_LEVELS - 1)


def keep_scale(p: float) -> float:
    """1 / (1 - p) for the rounded p, so that the dropped input's expectation is the input's exactly."""
    return MASK_LEVELS / (MASK_LEVELS - dropped_levels(p))


def kept_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The bool mask of the elements dropout keeps (each with probability 1 - p, p rounded to 1/65536), the same
    for the same seed.

    A CPU ``bernoulli_`` draws one number per element from a serial generator: 26% of a fp32 LoRA step of SmolLM2
    with the mask drawn twice (BENCHMARKS.md 'LoRA's fp32 step'). Here each 64-bit draw is cut into four uniform 16-bit
    integers compared with a threshold: 3.7-4.6x faster for SmolLM2's layer inputs.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # every 64-bit pattern equally likely
    levels = words.view(torch.int16)[:count]  # uniform over [-32768, 32767]
    return (levels >= dropped_levels(p) - MASK_LEVELS // 2).view(shape)


class _DroppedInputProduct(torch.autograd.Function):
    """``dropout(x) @ weight.T`` whose backward keeps ``x`` and a seed, not the dropped copy of ``x`` or its mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        # Under autocast the product runs in bf16 exactly as nn.Linear's would (autocast applies here too).
        return F.linear(x * kept_mask(x.shape, p, seed, x.device) * keep_scale(p), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        keep = kept_mask(x.shape, ctx.p, ctx.seed, x.device)  # the forward's mask, drawn again
        scale = keep_scale(ctx.p)
        grad_x = grad_weight = None
        # The dtypes follow autograd through an autocast nn.Linear: products in the gradient's dtype (bf16 under
        # autocast), then cast back to each input's own dtype, then dropout's backward (mask and scale).
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype) * keep * scale
        if ctx.needs_input_grad[1]:
            dropped = (x * keep * scale).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_weight, None, None


class DroppedInputLinear(nn.Linear):
    """LoRA's A matrix with the adapter's input dropout inside it: ``lora_A(dropout(x))`` as one step.

    peft computes ``lora_B(lora_A(dropout(x)))``: the dropped input is a new tensor for every adapted layer, and
    lora_A keeps it for its weight gradient, with dropout's mask beside it. The layers that read the same input
    (q, k and v; gate and up) each keep their own copy, where without dropout they share ``x`` itself. Here the
    backward keeps ``x`` (shared) and the mask's seed, and draws the mask again: with dropout the graph keeps what
    it keeps without it (tests/test_lora_dropout.py), for two Bernoulli draws per layer instead of one.
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter: optimizer, saving and merging see no difference
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(x, self.weight)
        if not (x.requires_grad or self.weight.requires_grad):  # no backward: nothing is kept anyway
            return F.linear(F.dropout(x, self.p), self.weight)
        return _DroppedInputProduct.apply(x, self.weight, self.p, draw_seed())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout p={self.p}"


def with_dropout_in_lora_a(model: nn.Module) -> int:
    """Move each plain LoRA Linear's input dropout into its A matrix (:class:`DroppedInputLinear`), in place.

    Only where peft computes ``lora_B(lora_A(dropout(x)))``: DoRA and the other variants use the dropped input
    elsewhere too, so they keep their dropout module (a :class:`MaskDropout`). How many layers were changed.
    """
    moved = 0
    for module in model.modules():
        dropouts, a_matrices = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(a_matrices, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in dropouts.items():
            a_matrix = a_matrices[name] if name in a_matrices else None
            if (isinstance(dropout, nn.Dropout) and dropout.p > 0 and name not in variants
                    and type(a_matrix) is nn.Linear and a_matrix.bias is None):
                a_matrices[name] = DroppedInputLinear(a_matrix, dropout.p)
                dropouts[name] = nn.Identity()
                moved += 1
    return moved
