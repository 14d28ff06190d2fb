"""What `accelerate launch` asked for is what runs: process groups on CPU, FSDP on CPU, no silent lone process.

accelerate 1.15 has gaps that would otherwise make a distributed config quietly do something else:

- Workers started through torchrun (``MULTI_GPU``, FSDP and DeepSpeed configs, ``--multi_gpu``) are not
  told about ``use_cpu``; on a machine without CUDA each would set up no process group and train its own
  copy. ``join_cpu_process_group`` sets ``ACCELERATE_USE_CPU`` for them (gloo).
- It switches to FSDP only for GPU-like process groups, never for ``MULTI_CPU``: an FSDP config on CPU
  would run plain DDP. ``FsdpTrainerMixin`` builds the Trainer's Accelerator so that FSDP2 runs over
  gloo, and refuses to go on if FSDP was asked for and is not what accelerate set up.
- ``--cpu``, ``distributed_type: NO``/``MULTI_CPU`` or a missing ``--multi_gpu`` make ``accelerate launch``
  start ONE process even when it was given several processes or machines (it then expects mpirun, or
  the user, to start the others). ``refuse_lone_worker`` turns that into a one-line error.
- DeepSpeed on a machine without CUDA needs the gloo backend named in ``ddp_backend`` and no
  ``ACCELERATE_USE_CPU`` (with it accelerate skips DeepSpeed): ``launch_setting_defaults``.

Whatever the cause, a Trainer whose Accelerator is not the engine and process count that were launched
stops with a one-line error (``FsdpTrainerMixin.create_accelerator_and_postprocess``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

#: Set by accelerate's launchers in every process they start (the torchrun path and the simple one).
_LAUNCHED_BY_ACCELERATE = "ACCELERATE_MIXED_PRECISION"
#: World sizes that mpirun-style launchers set instead of WORLD_SIZE (what accelerate itself reads).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether the accelerate launch config (or --use_fsdp) asks for FSDP."""
    return env_flag("ACCELERATE_USE_FSDP")


def refuse_lone_worker() -> None:
    """One-line error when `accelerate launch` was asked for several processes but started only this one.

    accelerate's single-process launcher exports MASTER_ADDR exactly when it was given more than one
    process or machine; torchrun and mpirun also export a world size, which this process then lacks.
    """
    if _LAUNCHED_BY_ACCELERATE not in os.environ or "LOCAL_RANK" in os.environ:
        return
    if "MASTER_ADDR" not in os.environ or any(name in os.environ for name in _WORLD_SIZE_VARIABLES):
        return
    raise FinetuneError(
        "accelerate launch started only this process although MASTER_ADDR says several processes or machines "
        "were asked for (with --cpu, or distributed_type NO or MULTI_CPU, it leaves the others to mpirun or to "
        "you): launch with --multi_gpu or a MULTI_GPU/FSDP config such as launch/cpu_2proc.yaml (on CPU too) and "
        "without --cpu; unset MASTER_ADDR if one process was meant"
    )


def join_cpu_process_group() -> None:
    """Make torchrun-started workers on a machine without CUDA one gloo process group.

    Also for a single FSDP worker: FSDP needs a process group, even of one.
    """
    if "ACCELERATE_USE_CPU" in os.environ or env_flag("ACCELERATE_USE_DEEPSPEED"):
        # DeepSpeed sets up its own process group; with ACCELERATE_USE_CPU accelerate would skip DeepSpeed.
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (fsdp_requested() and "LOCAL_RANK" in os.environ):
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"


def launch_setting_defaults() -> dict[str, Any]:
    """Training settings the launch implies: gloo for DeepSpeed workers on a machine without CUDA.

    There accelerate hands DeepSpeed the backend named by ``ddp_backend``; left unset, it finds none and sets
    up a one-process state in every worker.
    """
    if env_flag("ACCELERATE_USE_DEEPSPEED") and "LOCAL_RANK" in os.environ:
        import torch

        if not torch.cuda.is_available():
            return {"ddp_backend": "gloo"}
    return {}


def prepare_launch_environment() -> None:
    """Called once at start-up, before anything builds accelerate's state."""
    refuse_lone_worker()
    join_cpu_process_group()


@contextmanager
def fsdp_on_cpu_process_group() -> Iterator[None]:
    """While the Accelerator is built, let accelerate's FSDP switch see a CPU process group.

    AcceleratorState turns a process group into FSDP only when its type is GPU-like (MULTI_GPU, MULTI_XPU,
    ...), a list MULTI_CPU is missing from although torch's FSDP2 runs on CPU over gloo. It copies the type
    from PartialState, so the CPU group is presented as MULTI_GPU for that one decision; the device (cpu)
    and backend (gloo) stay as they are, and AcceleratorState writes FSDP back into PartialState.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    shared = PartialState._shared_state
    relabel = fsdp_requested() and shared.get("distributed_type") == DistributedType.MULTI_CPU
    if relabel:
        shared["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        if relabel and shared.get("distributed_type") == DistributedType.MULTI_GPU:
            shared["distributed_type"] = DistributedType.MULTI_CPU


def wrap_blocks_apart_from_input_embeddings(plugin: Any, model: Any) -> None:
    """Name the blocks FSDP2 shards one by one: the model's ``_no_split_modules`` minus the input embeddings' holder.

    accelerate 1.15 shards every ``_no_split_modules`` class, then the input embedding module on its own;
    models that list their embeddings block there (BERT: BertEmbeddings, RoBERTa: RobertaEmbeddings) would
    have the word embeddings sharded twice, which fails in fully_shard. An explicit
    ``fsdp_transformer_layer_cls_to_wrap`` in the config is left as given.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if plugin.fsdp_version != 2 or policy is not transformer_auto_wrap_policy:
        return
    if plugin.transformer_cls_names_to_wrap is not None:
        return
    names = list(getattr(model, "_no_split_modules", None) or [])
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    holders = {
        type(module).__name__
        for module in model.modules()
        if embeddings is not None and type(module).__name__ in names and any(m is embeddings for m in module.modules())
    }
    if holders:
        plugin.transformer_cls_names_to_wrap = [name for name in names if name not in holders]


class FsdpTrainerMixin:
    """Trainer mixin: FSDP when the launch asks for it (on CPU too), and sharded best checkpoints found on all ranks."""

    accelerator: Any
    is_fsdp_enabled: bool

    def create_accelerator_and_postprocess(self) -> None:
        with fsdp_on_cpu_process_group():
            super().create_accelerator_and_postprocess()  # type: ignore[misc]
        got = f"{self.accelerator.distributed_type.value} with {self.accelerator.num_processes} process(es)"
        if fsdp_requested() and not self.is_fsdp_enabled:
            raise FinetuneError(f"the launch config asks for FSDP, but accelerate set up {got}")
        if env_flag("ACCELERATE_USE_DEEPSPEED") and not self.is_deepspeed_enabled:
            raise FinetuneError(f"the launch config asks for DeepSpeed, but accelerate set up {got}")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes != launched:
            raise FinetuneError(f"{launched} processes were launched, but accelerate set up {got}")
        if not self.is_fsdp_enabled:
            return
        plugin = self.accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 2 and plugin.cpu_ram_efficient_loading and self.accelerator.num_processes > 1:
            # Ranks > 0 hold the model on the meta device; accelerate re-pairs the Trainer's optimizer with the
            # sharded parameters by memory address, which meta tensors lack: they would step the wrong ones.
            raise FinetuneError(
                "fsdp_cpu_ram_efficient_loading: true does not work with the Trainer (transformers 5.24, accelerate "
                "1.15: the optimizer of ranks > 0 would be paired with the wrong parameters); set it to false"
            )
        model = getattr(self, "model", None)
        if model is not None:
            wrap_blocks_apart_from_input_embeddings(plugin, model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # The Trainer makes a checkpoint the best one only if its folder exists right after a barrier that
        # follows save_model(). With FSDP's SHARDED_STATE_DICT save_model writes nothing and the folder
        # appears later (optimizer and shard writes), so ranks could disagree about best_model_checkpoint:
        # at the end one rank loads the best model (a collective) while another saves (another one), a
        # hang. Creating the folder here, on every rank, before that barrier makes the check agree.
        if _internal_call and output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]
