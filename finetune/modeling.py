"""Loading pretrained checkpoints: mirror resolution, GGUF conversion cache, pad tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from finetune import adapters, mirror
from finetune.errors import FinetuneError

if TYPE_CHECKING:  # config imports the task registry, whose families use this module
    from finetune.config import ModelConfig, PeftSettings

CACHE_ENV = "FINETUNE_CACHE"
HEAD_SETTINGS = ("num_labels", "id2label", "label2id", "problem_type")
#: ModelConfig fields a saved run's base checkpoint is described by
BASE_MODEL_SETTINGS = ("model_name_or_path", "gguf_file", "revision", "trust_remote_code")


def cache_root() -> Path:
    """Where converted checkpoints are kept: $FINETUNE_CACHE, else ~/.cache/finetune."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "finetune")).expanduser()


def checkpoint_path(cfg: ModelConfig) -> str:
    """A path or Hub id that ``from_pretrained`` can read with no further arguments."""
    if cfg.gguf_file:
        return str(dense_gguf_copy(cfg))
    return mirror.resolve(cfg.model_name_or_path, "models")


def dense_gguf_copy(cfg: ModelConfig) -> Path:
    """A cached dense (dequantized) copy of a GGUF checkpoint, made on first use.

    Dequantizing takes tens of seconds and GGUF-quantized weights cannot be trained, so the dense
    weights are saved once, under a lock so that concurrent processes convert it only once, and
    moved into place whole so that an interrupted conversion is never mistaken for a finished one.
    """
    key = hashlib.sha1(f"{cfg.model_name_or_path}::{cfg.gguf_file}::{cfg.revision}".encode()).hexdigest()[:12]
    name = f"{cfg.model_name_or_path.replace('/', '--')}--{Path(cfg.gguf_file).stem}-{key}"
    target = cache_root() / "gguf" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, GgufConfig

        source = mirror.resolve(cfg.model_name_or_path, "models")
        kwargs = {"gguf_file": cfg.gguf_file, "revision": cfg.revision}
        model = mirror.load_or_explain(
            lambda path: AutoModelForCausalLM.from_pretrained(
                path, quantization_config=GgufConfig(dequantize=True), **kwargs
            ),
            cfg.model_name_or_path,
            "models",
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        # The weights are dense now; without this, save_pretrained refuses "quantized" models.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
    return target


def load_config(cfg: ModelConfig, **kwargs: Any) -> PretrainedConfig:
    return mirror.load_or_explain(
        lambda path: AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        ),
        cfg.model_name_or_path if not cfg.gguf_file else checkpoint_path(cfg),
        "models",
    )


def load_tokenizer(cfg: ModelConfig, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with a pad token (decoders often lack one: EOS is used)."""
    name = cfg.tokenizer_name or (checkpoint_path(cfg) if cfg.gguf_file else cfg.model_name_or_path)
    tokenizer = mirror.load_or_explain(
        lambda path: AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        ),
        name,
        "models",
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FinetuneError(f"tokenizer of '{name}' has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(auto_class: Any, cfg: ModelConfig, peft: PeftSettings | None = None, **kwargs: Any) -> PreTrainedModel:
    """``auto_class.from_pretrained`` on the resolved checkpoint, with the model settings applied.

    A run directory that holds a LoRA adapter loads as its base checkpoint with the adapter on top (a
    peft model). ``peft`` asks for a 4/8-bit base (QLoRA). The parameters the checkpoint lacked (a new
    head, a pooler) are listed on the model, for LoRA to train and save them in full.
    """
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    kwargs.update(adapters.quantization_kwargs(peft))
    local = Path(mirror.resolve(cfg.model_name_or_path, "models"))
    if not cfg.gguf_file and local.is_dir() and adapters.is_adapter_dir(local):
        return load_adapter_run(auto_class, cfg, local, **kwargs)
    model, info = mirror.load_or_explain(
        lambda path: auto_class.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, output_loading_info=True, **kwargs
        ),
        cfg.model_name_or_path if not cfg.gguf_file else checkpoint_path(cfg),
        "models",
    )
    setattr(model, adapters.NEW_WEIGHTS_ATTRIBUTE, sorted(info.get("missing_keys", ())))
    if adapters.is_quantized(model):
        adapters.keep_training_layout(model)
    return model


def load_adapter_run(auto_class: Any, cfg: ModelConfig, run_dir: Path, **kwargs: Any) -> Any:
    """The base checkpoint a saved adapter was trained on, with the adapter (and its full modules) applied."""
    from transformers import GenerationConfig

    saved = {k: v for k, v in adapters.saved_base_model(run_dir).items() if k in BASE_MODEL_SETTINGS}
    # The caller's settings object, pointed at the base (config is not imported here: see TYPE_CHECKING).
    base = dataclasses.replace(cfg, **{"gguf_file": None, "revision": "main", **saved})
    base.trust_remote_code = base.trust_remote_code or cfg.trust_remote_code
    trained = None
    if (run_dir / "config.json").is_file():  # the fine-tuned config: head size and labels, pad token
        trained = AutoConfig.from_pretrained(run_dir, trust_remote_code=base.trust_remote_code)
        for name in HEAD_SETTINGS:  # from_pretrained takes these as kwargs only without a config
            if name in kwargs:
                setattr(trained, name, kwargs.pop(name))
        quantization = adapters.saved_quantization(trained)  # a QLoRA run: its base quantized as trained
        if "quantization_config" not in kwargs:  # unless this run quantizes it itself
            kwargs.update(quantization)
    warm_started = trained is not None and trained.model_type == "encoder-decoder"
    if warm_started and load_config(base).model_type != "encoder-decoder":
        # bert2bert: the base is the encoder checkpoint warm-started as both halves, as in training
        model = mirror.load_or_explain(warm_started_bert2bert, base.model_name_or_path, "models")
        for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, name, getattr(trained, name, None))
    else:
        model = load_model(auto_class, base, **kwargs, **({"config": trained} if trained is not None else {}))
    if adapters.is_peft_model(model):  # an adapter trained on top of another adapter run
        model = model.merge_and_unload()
    elif adapters.is_quantized(model):  # as training prepared it, so that it computes in the same dtypes
        model = adapters.prepare_quantized_base(model)
    if (run_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(run_dir)
    return adapters.with_saved_adapter(model, run_dir)


def warm_started_bert2bert(path: str) -> PreTrainedModel:
    """An EncoderDecoderModel with both halves from one encoder checkpoint ("bert2bert").

    The decoder is loaded here rather than inside ``from_encoder_decoder_pretrained`` to learn which of
    its weights the checkpoint lacks (cross-attention, perhaps an LM head): LoRA trains and saves those in full.
    """
    from transformers import AutoModelForCausalLM, EncoderDecoderModel

    decoder_config = AutoConfig.from_pretrained(path)
    decoder_config.is_decoder = True
    decoder_config.add_cross_attention = True
    decoder, info = AutoModelForCausalLM.from_pretrained(path, config=decoder_config, output_loading_info=True)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, None, decoder_model=decoder)
    setattr(model, adapters.NEW_WEIGHTS_ATTRIBUTE, sorted(f"decoder.{key}" for key in info.get("missing_keys", ())))
    return model


def align_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder classifiers find the last real token through ``pad_token_id``: it must match the tokenizer."""
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
