"""One forward over a decoder's evaluation batch for both its loss and the KV cache that ``generate`` starts from.

A decoder-only evaluation batch needs two things: the teacher-forced loss over prompt + target, and greedy
outputs generated from the prompt alone. Done apart, the prompts go through the model twice: once in the loss
forward (rows right-padded) and again in generate's prefill (rows left-padded). The prompt is most of a row
(SciTLDR: about 380 of 400 tokens), so that second pass costs nearly as much as the first.

Here the batch is laid out once as ``[left padding | prompt][target | right padding]``, every prompt ending in
the same column, with position ids counted over real tokens as ``generate`` counts them. Causal attention keeps
the targets out of the prompt columns, so after the loss forward the cache cropped to those columns is the
cache generate's own prefill would have built from the left-padded prompts: the same tokens at the same
positions under the same mask. generate is then given that cache minus the last prompt token, which it feeds
itself to get the first logits. The loss is the plain loss of the same tokens; only where the padding sits
changed.

The cache is handed over only where that is exact: a plain ``DynamicCache`` of full-attention layers (a
sliding-window or linear-attention layer does not keep every position), greedy or sampled decoding of one
sequence per row (beam search copies the cache per beam) and no other cache implementation asked for.
Models whose forward takes no ``position_ids`` keep the two forwards. Elsewhere generate runs its own
prefill, as before.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer

from finetune.generation.encoding import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class PromptAlignedBatch:
    """A decoder batch laid out with every prompt ending at column ``prompt_width``, targets after it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    prompt_width: int

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The loss forward's inputs; it keeps its KV cache for generate."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "labels": self.labels, "use_cache": True}

    @property
    def prompt_ids(self) -> torch.Tensor:
        return self.input_ids[:, : self.prompt_width]

    @property
    def prompt_mask(self) -> torch.Tensor:
        return self.attention_mask[:, : self.prompt_width]


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from a mask: real tokens counted from 0, padding at 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def prompt_aligned(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_token_id: int
) -> PromptAlignedBatch:
    """Right-padded ``prompt + target`` rows (labels -100 on the prompt) re-laid with the prompts left-padded.

    The prompt of a row is its unlabelled real tokens and the target its labelled ones, as in
    ``left_padded_prompts``, which gives the same prompt columns.
    """
    real = attention_mask.bool()
    prompt_masks = real & (labels == IGNORE_INDEX)
    target_masks = real & (labels != IGNORE_INDEX)
    prompt_width = int(prompt_masks.sum(-1).max())
    target_width = int(target_masks.sum(-1).max())
    rows, width = len(input_ids), prompt_width + target_width
    ids = input_ids.new_full((rows, width), pad_token_id)
    mask = attention_mask.new_zeros((rows, width))
    aligned_labels = labels.new_full((rows, width), IGNORE_INDEX)
    for i in range(rows):
        prompt, target = input_ids[i][prompt_masks[i]], input_ids[i][target_masks[i]]
        start, end = prompt_width - len(prompt), prompt_width + len(target)
        ids[i, start:prompt_width], ids[i, prompt_width:end] = prompt, target
        mask[i, start:end] = 1
        aligned_labels[i, prompt_width:end] = labels[i][target_masks[i]]
    return PromptAlignedBatch(ids, mask, generation_positions(mask), aligned_labels, prompt_width)


def takes_position_ids(model: Any) -> bool:
    """Whether the causal LM's forward takes ``position_ids``: left padding shifts positions otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own forward
    return "position_ids" in inspect.signature(base.forward).parameters


def cache_reusable(cache: Any, generation_config: GenerationConfig) -> bool:
    """Whether generate may start from the loss forward's cache with the same result as its own prefill."""
    if type(cache) is not DynamicCache or not cache.layers:
        return False
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return False  # sliding-window, linear-attention and quantized layers do not keep every position
    one_sequence = (generation_config.num_beams or 1) == 1 and (generation_config.num_return_sequences or 1) == 1
    return one_sequence and generation_config.cache_implementation is None


def prompt_cache(cache: DynamicCache, batch: PromptAlignedBatch) -> DynamicCache:
    """The loss forward's cache cut back to all prompt columns but the last, in place."""
    cache.crop(-(batch.input_ids.shape[1] - batch.prompt_width + 1))
    return cache
