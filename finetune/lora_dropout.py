"""LoRA's input dropout that keeps a 1-byte mask for the backward pass instead of a 4-byte noise tensor.

peft applies ``nn.Dropout`` to the input of every adapted layer (210 of them in SmolLM2: 7 per block). On a CPU,
``torch.nn.functional.dropout`` is computed as ``input * noise`` with a float noise tensor (Bernoulli / (1 - p)),
and the multiplication keeps that noise for the backward: 4 bytes per input element per adapted layer, in fp32
even under bf16 autocast (dropout is not autocast). Measured with ``torch.autograd.graph.saved_tensors_hooks`` on
a 4 x 448-token SmolLM2 batch under bf16 autocast, that was 1012 MB of the 3005 MB the LoRA graph kept, where
the dropout-free LoRA graph kept 1993 MB and full fine-tuning's 2160 MB (BENCHMARKS.md 'Decoder memory and QLoRA').
``torch.native_dropout`` (what CUDA's fused dropout runs) draws the same Bernoulli(1 - p) mask, scales by the same
1 / (1 - p), and keeps the mask as bool: a quarter of the memory, same distribution, same expected update.
"""

from __future__ import annotations

import torch
from torch import nn


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
