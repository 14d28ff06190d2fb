"""Loading pretrained checkpoints: mirror resolution, GGUF conversion cache, pad tokens."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from finetune import mirror
from finetune.errors import FinetuneError

if TYPE_CHECKING:  # config imports the task registry, whose families use this module
    from finetune.config import ModelConfig

CACHE_ENV = "FINETUNE_CACHE"


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


def load_model(auto_class: Any, cfg: ModelConfig, **kwargs: Any) -> PreTrainedModel:
    """``auto_class.from_pretrained`` on the resolved checkpoint, with the model settings applied."""
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return mirror.load_or_explain(
        lambda path: auto_class.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        ),
        cfg.model_name_or_path if not cfg.gguf_file else checkpoint_path(cfg),
        "models",
    )


def align_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Decoder classifiers find the last real token through ``pad_token_id``: it must match the tokenizer."""
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
