"""Shared fixtures: the offline mirror, and tiny random-weight checkpoints built from configs.

Tiny models (hidden size 32, two layers) stand in for every architecture path, as transformers' own
tests do; the real mirror models are used only by the few quality checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MIRROR = SHARED / "hub"
SAMPLES = SHARED / "data"
MINILM = MIRROR / "models" / "sentence-transformers" / "all-MiniLM-L6-v2"
GLUE = MIRROR / "datasets" / "nyu-mll" / "glue"

ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta-v2")
DECODERS = ("gpt2", "llama")
SEQ2SEQ = ("t5", "bart", "marian", "mbart")


# Set at import, before any test module imports huggingface_hub: it reads HF_HUB_OFFLINE once, at import.
os.environ["FINETUNE_HUB_MIRROR"] = str(MIRROR)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Every test sees a CPU without bf16 units (finetune.precision reads this instead of /proc/cpuinfo), so runs
# that leave precision unset compute in fp32 on every host and the numbers tests compare hold; the precision
# tests set it themselves. Subprocesses (accelerate launch) inherit it.
os.environ["FINETUNE_CPU_FLAGS"] = ""


@pytest.fixture(autouse=True, scope="session")
def offline_mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test runs offline against ../shared/hub, with a private conversion cache."""
    if not MIRROR.is_dir():
        pytest.exit(f"the offline mirror {MIRROR} is missing (tests read ../shared beside the checkout)", 2)
    os.environ.setdefault("FINETUNE_CACHE", str(tmp_path_factory.mktemp("finetune-cache")))
    return MIRROR


def mrpc_sentences(limit: int = 2000) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(GLUE / "mrpc" / "train-00000-of-00001.parquet", columns=["sentence1", "sentence2"])
    return table.column("sentence1").to_pylist()[:limit] + table.column("sentence2").to_pylist()[:limit]


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (GPT-2/RoBERTa/Llama style) trained on MRPC text, vocabulary 600."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(mrpc_sentences(), vocab_size=600, min_frequency=2, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    path = tmp_path_factory.mktemp("bpe-tokenizer")
    tokenizer.save_pretrained(path)
    return path


def tiny_config(arch: str, vocab_size: int, tokenizer) -> object:
    """A two-layer, width-32 config of the given architecture."""
    from transformers import AutoConfig

    small = {"vocab_size": vocab_size}
    ids = {
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
        "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
    }
    per_arch = {
        "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37),
        "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=520, **ids),
        "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=37),
        "electra": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37),
        "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=512, **ids),
        "llama": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=512, **ids),
        # a sliding window shorter than the prompts: its KV cache keeps only the window
        "mistral": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=512, sliding_window=8, **ids),
        "t5": dict(d_model=32, d_ff=37, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                   decoder_start_token_id=ids["pad_token_id"], **ids),
        "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                     max_position_embeddings=512, decoder_start_token_id=ids["eos_token_id"], **ids),
        "marian": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                       max_position_embeddings=512, decoder_start_token_id=ids["pad_token_id"], **ids),
        "mbart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                      max_position_embeddings=512, decoder_start_token_id=ids["eos_token_id"], **ids),
    }
    return AutoConfig.for_model(arch, **small, **per_arch[arch])


def uses_wordpiece(arch: str) -> bool:
    return arch in ("bert", "distilbert", "electra", "deberta-v2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Callable[[str], Path]:
    """arch -> folder holding a tiny random-weight checkpoint and a tokenizer, as from_pretrained expects."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    built: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch in built:
            return built[arch]
        tokenizer = AutoTokenizer.from_pretrained(MINILM if uses_wordpiece(arch) else bpe_tokenizer_dir)
        config = tiny_config(arch, len(tokenizer), tokenizer)
        torch.manual_seed(0)
        if arch in (*DECODERS, "mistral"):  # mistral: only where a sliding window is the point
            model = AutoModelForCausalLM.from_config(config)
        elif arch in SEQ2SEQ:
            model = AutoModelForSeq2SeqLM.from_config(config)
        else:
            model = AutoModelForMaskedLM.from_config(config)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        built[arch] = path
        return path

    return build


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
