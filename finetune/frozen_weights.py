"""Frozen Linear weights held in the autocast dtype (bf16) instead of fp32, for evaluation and for LoRA training.

Autocast keeps its bf16 copy of a weight for the rest of the autocast region only for tensors that require a
gradient. A frozen weight (LoRA's base model, every weight of a loaded adapter run) is cast anew by every
forward: generation reads the whole model as fp32 and writes it as bf16 for each new token, and a training step
keeps the bf16 cast of every frozen layer for its backward, beside the fp32 original that nothing else reads.
Linear layers are what autocast computes in bf16 anyway, so holding their weights in bf16 gives bit for bit the
products autocast gives (tests/test_frozen_weights.py); norms and embeddings stay as they are.

* :func:`frozen_linear_weights_in` (evaluation): bf16 copies beside the fp32 parameters, put back after.
* :func:`frozen_linear_weights_released` (LoRA training): the fp32 values leave memory for the length of
  ``train()`` and come back exactly after (upcast where bf16 holds them exactly, else from a spill file).
* :class:`FrozenWeightsMixin`: the Trainer side, entering the second around ``train()`` where it applies.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

logger = logging.getLogger("finetune")

#: model types whose forward casts activations to a Linear weight's dtype (the T5 family's feed-forward, before
#: ``wo``): with that weight in bf16, two gradient contributions would be summed in bf16 instead of fp32, so the
#: adapter would no longer train bit for bit as under autocast (tests/test_frozen_weights.py measured it on T5)
READS_WEIGHT_DTYPE = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})


@contextlib.contextmanager
def frozen_linear_weights_in(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Within: the frozen fp32 weights and biases of ``model``'s Linear layers held in ``dtype`` (the autocast
    dtype), the original parameters put back after; yields how many layers were changed.

    Generation runs a forward per new token, each of which would cast every frozen weight again. A weight tied
    to the embedding gets a copy on the Linear only, so the embedding still looks up fp32 rows. Quantized
    layers (bitsandbytes' Linear4bit/8bitLt subclass Linear; their weights are not fp32) are skipped.
    """
    originals: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    if dtype is not None:
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            for name in ("weight", "bias"):
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and param.dtype == torch.float32 and not param.requires_grad:
                    originals.append((module, name, param))
                    setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
    try:
        yield len({id(module) for module, _, _ in originals})
    finally:
        for module, name, param in originals:
            setattr(module, name, param)


def releasable_linear_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen fp32 weights and biases that only Linear layers read, the model's input and output embeddings
    excepted (a tied lm_head is the embedding; peft may save both with an adapter), each once."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        with contextlib.suppress(AttributeError, NotImplementedError):
            layer = getattr(model, getter)()
            embeddings |= {id(p) for p in layer.parameters()} if layer is not None else set()
    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for param in module.parameters(recurse=False):
            if (param.dtype == torch.float32 and not param.requires_grad and id(param) not in embeddings
                    and all(isinstance(owner, torch.nn.Linear) for owner in owners[id(param)])):
                found[id(param)] = param
    return list(found.values())


def spilled(tensors: list[torch.Tensor], directory: Path) -> BinaryIO:
    """``tensors`` written to a nameless file in ``directory`` (``O_TMPFILE`` where the OS has it: a killed run
    leaves nothing behind), for :func:`read_back`. Not mapped: a mapping's pages, once read, count as the
    process's resident memory, and nothing reads them before training ends."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = tempfile.TemporaryFile(prefix=".frozen-fp32-", suffix=".pt", dir=directory)
    torch.save(tensors, handle)
    return handle


def read_back(handle: BinaryIO) -> list[torch.Tensor]:
    """The tensors :func:`spilled` wrote, read into memory; the file is closed (and so deleted)."""
    with handle:
        handle.seek(0)
        return torch.load(handle, weights_only=True)


@contextlib.contextmanager
def frozen_linear_weights_released(
    model: torch.nn.Module, dtype: torch.dtype | None, spill_dir: Path
) -> Iterator[dict[str, int]]:
    """Within: the frozen fp32 Linear weights of ``model`` held only in ``dtype``; exactly the fp32 values after.

    For LoRA training under autocast in ``dtype``: every step's forward would cast each frozen weight to bf16
    and keep the cast for its backward, beside an fp32 original nothing reads until training ends. Each
    parameter keeps its identity (its ``.data`` changes dtype, as ``Module.half()`` does), so DDP, the optimizer
    and ties see the same objects. A weight that bf16 holds exactly (a checkpoint stored in bf16) comes back by
    upcasting; any other is written to a nameless file in ``spill_dir`` first and read back from it. Yields how many
    parameters came back each way (``exact``, ``spilled``).
    """
    params = releasable_linear_parameters(model) if dtype is not None else []
    low = [param.detach().to(dtype) for param in params]
    exact = [torch.equal(copy.to(param.dtype), param.detach()) for param, copy in zip(params, low, strict=True)]
    to_spill = [p.detach() for p, is_exact in zip(params, exact, strict=True) if not is_exact]
    handle = spilled(to_spill, spill_dir) if to_spill else None
    counts = {"exact": sum(exact), "spilled": len(to_spill)}
    for param, copy in zip(params, low, strict=True):
        param.data = copy
    del low, to_spill
    try:
        yield counts
    finally:
        stored = iter(read_back(handle) if handle is not None else [])
        for param, is_exact in zip(params, exact, strict=True):
            param.data = param.detach().float() if is_exact else next(stored).to(param.device)


class FrozenWeightsMixin:
    """For a Trainer: LoRA training under bf16 autocast holds its frozen Linear weights in bf16 only.

    Not for DoRA (its magnitude reads the base weight outside the products), FSDP or DeepSpeed (whose flat
    parameters are their own), a model without an adapter (its checkpoints save every weight), nor the model
    types of ``READS_WEIGHT_DTYPE``.
    """

    #: False keeps the fp32 frozen weights through training, as before (benchmarks/lora.py compares both)
    release_frozen_weights: bool = True

    #: how many frozen parameters the last ``train()`` held in bf16, by how they came back (exact, spilled)
    released_frozen_weights: dict[str, int] | None = None

    def train(self, *args: Any, **kwargs: Any):
        spill_dir = Path(self.args.output_dir)
        with frozen_linear_weights_released(self.model, self.training_weight_dtype(), spill_dir) as counts:
            self.released_frozen_weights = counts
            if any(counts.values()):
                logger.warning("LoRA training holds %d frozen Linear weights in bf16 only (%d of them spilled to a "
                            "file in %s until training ends)", sum(counts.values()), counts["spilled"], spill_dir)
            return super().train(*args, **kwargs)

    def training_weight_dtype(self) -> torch.dtype | None:
        """bf16 where the frozen weights can live in it through training; None: leave them in fp32."""
        adapters = getattr(self.model, "peft_config", None) or {}
        dora = any(getattr(config, "use_dora", False) for config in adapters.values())
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        bf16 = self.accelerator.mixed_precision == "bf16"
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        # model_init builds the model inside train(): the one here is not the one trained (finetune tune)
        applies = adapters and not dora and not sharded and self.model_init is None and self.release_frozen_weights
        applies = applies and model_type not in READS_WEIGHT_DTYPE
        return torch.bfloat16 if bf16 and applies else None
