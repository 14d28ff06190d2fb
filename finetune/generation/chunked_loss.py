"""A decoder's training loss from its final hidden states in chunks, so the batch's full logits never exist.

A causal LM's head turns every position's hidden state into vocabulary-wide logits: for SmolLM2 (49152 tokens)
a batch of 4 x 512 positions is 400 MB of fp32 logits, kept for the backward with their softmax. The loss needs
only the positions that have a label (the target, not the prompt), and only one chunk of them at a time. So
during training the head's forward returns an empty tensor and keeps its input; the loss then runs the head
chunk by chunk over the labelled positions under ``torch.utils.checkpoint``, which recomputes each chunk's
logits in the backward instead of keeping them. The arithmetic is the plain loss's: the same shift
(position t predicts label t+1, so padding-free rows, whose first label is -100, stay apart), the same sum
over tokens divided by the Trainer's ``num_items_in_batch``, label smoothing as transformers' LabelSmoother.

Neither transformers nor an installed library provides this on a CPU (Liger-Kernel's fused linear
cross-entropy needs Triton on a GPU). Off under FSDP and DeepSpeed, whose sharded head weights exist only
inside their own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_pt_utils import LabelSmoother

from finetune.generation.encoding import IGNORE_INDEX

#: labelled positions per chunk: 1024 x 49152 fp32 logits = 200 MB at a time for SmolLM2
CHUNK_TOKENS = 1024
#: config attributes of models whose head does more than a Linear (their logits are rescaled or capped)
HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why this model's loss cannot come from its hidden states (None: it can)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings (lm_head)"
    config = getattr(model, "config", None)
    extras = [name for name in HEAD_EXTRAS if getattr(config, name, None) not in (None, 0, 1, 1.0)]
    if extras:
        return f"its logits are transformed after the head ({', '.join(extras)})"
    return None


def token_loss_sum(head_forward: Any, hidden: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed cross-entropy of one chunk of labelled positions (logits upcast to fp32, as ForCausalLMLoss)."""
    logits = head_forward(hidden).float()
    return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing)


def chunked_causal_loss(
    head_forward: Any,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    smoothing: float = 0.0,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """The causal-LM loss of ``hidden`` (batch x length x width) against ``labels`` (batch x length)."""
    width = hidden.shape[-1]
    targets = labels[..., 1:].reshape(-1).to(hidden.device)
    states = hidden[..., :-1, :].reshape(-1, width)
    labelled = targets != IGNORE_INDEX
    states, targets = states[labelled], targets[labelled]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            token_loss_sum, head_forward, states[start:end], targets[start:end], smoothing, use_reentrant=False
        )
    if num_items_in_batch is None:
        return total / max(len(targets), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class HiddenStateLoss:
    """The Trainer's ``compute_loss_func`` for decoder-only models: chunked loss while :meth:`training` is on.

    Outside it (evaluation loss, prediction) the head computes its logits as usual and the loss is the plain one.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        self.head = model.get_output_embeddings()
        self.label_smoothing = label_smoothing
        self.hidden: torch.Tensor | None = None
        self.head_forward = self.head.forward

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The head keeps its input and returns no logits for the forward inside this block."""

        def keep_input(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.hidden = hidden
            return hidden.new_empty((*hidden.shape[:-1], 0))

        self.head.forward = keep_input  # the instance attribute shadows the class's forward: nothing renamed
        try:
            yield
        finally:
            del self.head.forward
            self.hidden = None

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
        if self.hidden is None:
            if self.label_smoothing:
                smoother = LabelSmoother(epsilon=self.label_smoothing)
                return smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
            logits = outputs["logits"]
            return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        hidden, self.hidden = self.hidden, None
        return chunked_causal_loss(self.head_forward, hidden, labels, num_items_in_batch, self.label_smoothing)
