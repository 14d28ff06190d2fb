"""LoRA, DoRA and QLoRA through peft: wrap a loaded model, reload a saved adapter, merge it.

A LoRA run trains low-rank updates of the frozen base weights plus, in full, every module that the
base checkpoint does not provide: the classification head (``classifier``/``score``, which peft's
SEQ_CLS task type adds itself) and any other freshly initialised weight (BERT's pooler, DistilBERT's
``pre_classifier``, DeBERTa's pooler). Those go into ``modules_to_save`` so that they are saved with the
adapter; a module left out would come back with new random weights when the adapter is reloaded, and the
reloaded model would score differently from the one that was trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from finetune.errors import FinetuneError
from finetune.lora_dropout import with_dropout_in_lora_a, with_mask_dropout

if TYPE_CHECKING:  # config imports the task registry, whose families load models through this module
    from finetune.config import PeftSettings

#: the resolved config a run writes (config.RESOLVED_CONFIG_NAME; not imported from there: config imports the
#: task registry, whose families load models through this module)
RUN_CONFIG_NAME = "finetune_config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the attributes transformers' sequence-classification models keep their head in
HEAD_NAMES = ("classifier", "score")
ALL_LINEAR = "all-linear"
#: attribute the model loader sets on a freshly loaded model: parameters the checkpoint did not provide
NEW_WEIGHTS_ATTRIBUTE = "finetune_new_weights"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_of(model: Any) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if is_peft_model(model) else model


# ---------------------------------------------------------------------------------------------------------
# Loading: quantized bases (QLoRA) and saved adapters
# ---------------------------------------------------------------------------------------------------------


def quantization_kwargs(settings: PeftSettings | None) -> dict[str, Any]:
    """from_pretrained kwargs that load the frozen base in 4 or 8 bits (bitsandbytes), or nothing."""
    if settings is None or not (settings.load_in_4bit or settings.load_in_8bit):
        return {}
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if settings.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype_4bit(),
            bnb_4bit_use_double_quant=True,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quantization, "device_map": quantized_device_map()}


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FinetuneError("load_in_4bit/load_in_8bit need bitsandbytes: pip install 'finetune[qlora]'") from None
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, OncePerMessage) for f in log.filters):
        log.addFilter(OncePerMessage())


class OncePerMessage(logging.Filter):
    """Each message once: an 8-bit layer evaluating fp32 inputs on a CPU warns at every matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def compute_dtype_4bit() -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where the device computes it natively, else fp16 (GPU) or fp32."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from finetune.precision import cpu_bf16_unit, cpu_flags

    # Without bf16 units the CPU emulates bf16, slower than fp32 (finetune.precision); it has no fast fp16 either.
    return torch.bfloat16 if cpu_bf16_unit(cpu_flags()) else torch.float32


def quantized_device_map() -> dict[str, int | str]:
    """Quantized weights are placed at load time: each process onto its own GPU, or all onto the CPU."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def is_quantized(model: Any) -> bool:
    """Whether the (base) model holds bitsandbytes 4- or 8-bit layers."""
    base = base_of(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def keep_training_layout(model: PreTrainedModel) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout training uses, also in evaluations.

    On a CPU with AVX512-BF16, a Linear4bit repacks its weights for a bf16 inference kernel at its first
    forward without gradients and keeps them so; when training continues after an evaluation, the forward
    takes that kernel, whose backward gives other gradients, and evaluations compute in bf16 whatever the
    compute dtype. Switched off, every forward dequantizes as in training.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def saved_quantization(trained: PretrainedConfig) -> dict[str, Any]:
    """from_pretrained kwargs that quantize a saved adapter's base as it was trained (QLoRA), or nothing.

    A QLoRA run's config.json records how its base was quantized (quantization_config, compute dtype
    included). The record is taken off the config: passed on, it would declare the base checkpoint's full
    precision weights to be quantized ones already.
    """
    saved = getattr(trained, "quantization_config", None)
    if saved is None:
        return {}
    del trained.quantization_config
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    record = saved if isinstance(saved, dict) else saved.to_dict()
    return {"quantization_config": BitsAndBytesConfig.from_dict(dict(record)), "device_map": quantized_device_map()}


def prepare_quantized_base(model: PreTrainedModel, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """peft's preparation of a 4/8-bit base: frozen, its norms and other unquantized weights in fp32.

    Training applies it before the adapter; a saved adapter's base gets it too, so that its evaluation
    computes in the dtypes training did.
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def saved_base_model(run_dir: Path) -> dict[str, Any]:
    """The base checkpoint of a saved adapter: the run's model settings, else what adapter_config.json names."""
    saved = run_dir / RUN_CONFIG_NAME
    document = (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else {}
    model = {k: v for k, v in document.get("model", {}).items() if v is not None}
    if model.get("model_name_or_path"):
        return model
    adapter = json.loads((run_dir / ADAPTER_CONFIG).read_text())
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise FinetuneError(f"{run_dir / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    return {"model_name_or_path": base, **({"revision": adapter["revision"]} if adapter.get("revision") else {})}


def with_saved_adapter(base: PreTrainedModel, run_dir: Path) -> Any:
    """``base`` with the adapter (and the fully trained modules) saved in ``run_dir``, for inference."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(run_dir), is_trainable=False)


# ---------------------------------------------------------------------------------------------------------
# Training: a fresh adapter on a loaded model
# ---------------------------------------------------------------------------------------------------------


def peft_task_type(model: PreTrainedModel) -> str:
    """peft's task type for a transformers model: what its forward takes and returns."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if model.config.is_encoder_decoder or name == "EncoderDecoderModel":
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"


def module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]


def matches(name: str, wanted: str) -> bool:
    """peft's rule for target module names: the full name, or its last dotted parts."""
    return name == wanted or name.endswith("." + wanted)


def check_module_names(model: torch.nn.Module, wanted: list[str], setting: str) -> None:
    """Every name given must name a module of the model (one-line error otherwise)."""
    names = module_names(model)
    for item in wanted:
        if item == ALL_LINEAR and setting == "lora_target_modules":
            continue
        if not any(matches(name, item) for name in names):
            linear = sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})
            raise FinetuneError(
                f"{setting}: the model ({type(model).__name__}) has no module named '{item}'; its linear modules "
                f"are named {', '.join(linear[:12])}{', ...' if len(linear) > 12 else ''} (or use all-linear)"
            )


def new_weight_modules(model: PreTrainedModel, task_type: str) -> list[str]:
    """Modules holding parameters the checkpoint did not provide (randomly initialised), outside the head."""
    parameters = dict(model.named_parameters())
    owners = {key.rsplit(".", 1)[0] for key in getattr(model, NEW_WEIGHTS_ATTRIBUTE, ()) if key in parameters
              and "." in key}
    heads = [name for name in HEAD_NAMES if hasattr(model, name)] if task_type == "SEQ_CLS" else []
    return sorted(owner for owner in owners if not any(owner == h or owner.startswith(h + ".") for h in heads))


def saved_in_full(model: PreTrainedModel, settings: PeftSettings, task_type: str) -> tuple[list[str], list[str]]:
    """(modules_to_save, linear modules that must not also get LoRA because they are trained in full)."""
    wanted = list(settings.lora_modules_to_save or []) + new_weight_modules(model, task_type)
    if task_type == "SEQ_CLS":  # peft adds these itself; named here to keep LoRA off them
        wanted += [name for name in HEAD_NAMES if hasattr(model, name)]
    # peft wraps every module whose name ends with an entry; drop entries inside a module already wrapped.
    names = module_names(model)
    wrapped = [name for name in names if any(name.endswith(entry) for entry in wanted)]
    outer = [name for name in wrapped if not any(name.startswith(other + ".") for other in wrapped)]
    keep = sorted({entry for entry in wanted if any(name.endswith(entry) for name in outer)})
    inside = [name for name in linear_module_names(model) if any(name == o or name.startswith(o + ".") for o in outer)]
    return keep, inside


def lora_config(model: PreTrainedModel, settings: PeftSettings, task_type: str) -> Any:
    from peft import LoraConfig

    targets = settings.lora_target_modules
    keep, inside = saved_in_full(model, settings, task_type)
    return LoraConfig(
        task_type=task_type,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        modules_to_save=keep or None,
        exclude_modules=inside or None,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
    )


def with_new_adapter(model: Any, settings: PeftSettings, base_name: str, gradient_checkpointing: bool = False) -> Any:
    """``model`` wrapped by peft with a fresh LoRA adapter; only the adapter and the full modules train."""
    from peft import get_peft_model

    quantize = settings.load_in_4bit or settings.load_in_8bit
    if is_peft_model(model):  # starting from a saved adapter: its update becomes part of the base
        # A base this run quantizes stays so (peft quantizes the merged weights again); else it is dequantized.
        model = model.merge_and_unload() if quantize else merged(model)
    targets = [t for item in settings.lora_target_modules for t in str(item).split(",") if t]
    settings = dataclasses.replace(settings, lora_target_modules=targets)
    check_module_names(model, targets, "lora_target_modules")
    check_module_names(model, list(settings.lora_modules_to_save or []), "lora_modules_to_save")
    if quantize:
        model = prepare_quantized_base(model, gradient_checkpointing)
    task_type = peft_task_type(model)
    config = lora_config(model, settings, task_type)
    try:
        wrapped = get_peft_model(model, config)
    except (ValueError, TypeError) as error:
        raise FinetuneError(f"LoRA cannot be applied: {str(error).splitlines()[0]}") from None
    # The saved adapter names the checkpoint users know (a Hub id), not a local cache path.
    wrapped.peft_config["default"].base_model_name_or_path = base_name
    # What the backward keeps for LoRA's input dropout: nothing beyond the layer's input for plain LoRA layers,
    # a 1-byte mask per input element (not 4 bytes of noise) for the variants that keep a dropout module.
    # QLoRA keeps the dropout module: its exact-merge test was not re-established with the moved dropout.
    if not quantize:
        with_dropout_in_lora_a(wrapped)
    with_mask_dropout(wrapped)
    return wrapped


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable and total parameters (what the model card reports)."""
    if is_peft_model(model):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(total)}


def adapter_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The adapter settings saved in a run (adapter_config.json), or None for a full model."""
    path = Path(run_dir) / ADAPTER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# Saving and merging
# ---------------------------------------------------------------------------------------------------------


def save_model_files(model: Any, out: Path) -> None:
    """Beside the adapter, the fine-tuned model's config (labels, pad token) and generation config.

    The adapter files say how to change the base weights; these say what the model is (its head's labels
    for ``finetune evaluate``, how it generates), as in a full run.
    """
    base = base_of(model)
    base.config.architectures = [type(base).__name__]  # what save_pretrained of the full model would record
    base.config.save_pretrained(out)
    generation = getattr(base, "generation_config", None)
    if generation is not None and base.can_generate():
        generation.save_pretrained(out)


def merged(model: Any) -> PreTrainedModel:
    """The adapter folded into the base weights: a plain transformers model with no peft layers."""
    if is_quantized(model):
        model = over_dequantized_base(model)
    return model.merge_and_unload()


def over_dequantized_base(model: Any) -> Any:
    """The same adapter over the dequantized base: plain Linear layers holding what the 4/8-bit layers compute.

    The adapter was trained over the quantized weights, so it is merged into their dequantized values (the
    merged model computes what the adapter model does), in the dtype of the model's other weights (fp32 after
    peft's preparation), so that the merged model has one dtype. peft's own merge into 4/8-bit layers would
    quantize the sum again, rounding much of the update away; the original full-precision checkpoint is a
    base the adapter never saw.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = model.active_adapter
    config = model.peft_config[name]
    state = get_peft_model_state_dict(model, adapter_name=name)  # the adapter and the modules trained in full
    base = model.unload()  # the base as it was, with the modules trained in full as trained
    dense = base.dequantize(dtype=base.get_input_embeddings().weight.dtype)
    again = get_peft_model(dense, config, adapter_name=name)
    set_peft_model_state_dict(again, state, adapter_name=name)
    return again


def write_merged_model(model: Any, out: Path) -> None:
    """Replace the adapter files in ``out`` with the merged full model (config, weights)."""
    full = merged(model)
    full.save_pretrained(out)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (out / name).unlink(missing_ok=True)


def copy_run_files(run_dir: Path, out: Path) -> None:
    """What makes ``out`` a run directory besides the model: settings, metrics, tokenizer, predictions."""
    out.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if path.is_file() and path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"):
            shutil.copy2(path, out / path.name)

