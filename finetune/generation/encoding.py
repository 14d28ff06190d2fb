"""Text-to-text examples as token ids: where a raw row keeps its texts, and how each kind of model reads them.

The tokenizing functions are plain functions of plain values, so that ``datasets`` can fingerprint them
and cache the tokenized splits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

IGNORE_INDEX = -100  # label value the loss skips
SOURCE_MARK = "\x00SOURCE\x00"  # stands for the source text while a prompt template is rendered


class ModelKind(str, enum.Enum):
    ENCODER_DECODER = "encoder-decoder"
    BERT2BERT = "bert2bert"
    DECODER_ONLY = "decoder-only"


def model_kind(checkpoint: PretrainedConfig) -> ModelKind:
    """How a checkpoint generates: its own decoder, a decoder warm-started from the encoder, or as one decoder."""
    if checkpoint.model_type == "encoder-decoder":  # a bert2bert model already fine-tuned
        return ModelKind.BERT2BERT
    if getattr(checkpoint, "is_encoder_decoder", False):
        return ModelKind.ENCODER_DECODER
    if checkpoint.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return ModelKind.BERT2BERT
    return ModelKind.DECODER_ONLY


# ---------------------------------------------------------------------------------------------------------
# Reading texts out of raw rows
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextColumns:
    """Where a raw row keeps its source text and reference(s): a column, or a key of a dict column."""

    source: str
    reference: str | None
    source_key: str | None = None
    reference_key: str | None = None

    def source_values(self, batch: dict[str, list]) -> list[Any]:
        return [value[self.source_key] if self.source_key else value for value in batch[self.source]]

    def sources(self, batch: dict[str, list]) -> list[str]:
        """Source texts; a list of sentences (SciTLDR) is joined with spaces."""
        return [" ".join(v) if isinstance(v, list) else str(v) for v in self.source_values(batch)]

    def references(self, batch: dict[str, list]) -> list[list[str]] | None:
        """All references of each example (one or more), or None when the rows have none."""
        if self.reference is None or self.reference not in batch:
            return None
        values = [value[self.reference_key] if self.reference_key else value for value in batch[self.reference]]
        return [[str(r) for r in v] if isinstance(v, list) else [str(v)] for v in values]

    def columns(self) -> list[str]:
        return [c for c in (self.source, self.reference) if c]


# ---------------------------------------------------------------------------------------------------------
# Tokenization (plain functions of plain values: datasets fingerprints them to cache the result)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """Everything the tokenizing map function needs, in a form datasets can fingerprint."""

    tokenizer: PreTrainedTokenizerBase
    columns: TextColumns
    kind: ModelKind
    max_source_length: int
    max_target_length: int
    source_prefix: str = ""
    #: decoder-only: the prompt text before and after the source
    prompt_head: str = ""
    prompt_tail: str = ""


def encode_batch(batch: dict[str, list], encoding: Encoding) -> dict[str, list]:
    if encoding.kind is ModelKind.DECODER_ONLY:
        return encode_decoder_only(batch, encoding)
    return encode_encoder_decoder(batch, encoding)


def encode_encoder_decoder(batch: dict[str, list], encoding: Encoding) -> dict[str, list]:
    """Source ids, and target ids as ``labels`` (the first reference) where the rows have references."""
    tok = encoding.tokenizer
    sources = [encoding.source_prefix + s for s in encoding.columns.sources(batch)]
    encoded = dict(tok(sources, max_length=encoding.max_source_length, truncation=True))
    references = encoding.columns.references(batch)
    if references is not None:
        targets = [refs[0] if refs else "" for refs in references]
        labels = tok(text_target=targets, max_length=encoding.max_target_length, truncation=True)["input_ids"]
        if encoding.kind is ModelKind.BERT2BERT:
            # BERT wraps text in [CLS] ... [SEP]; [CLS] is the decoder start token, so it is input, not target.
            labels = [ids[1:] if ids and ids[0] == tok.cls_token_id else ids for ids in labels]
        encoded["labels"] = labels
    return encoded


def encode_decoder_only(batch: dict[str, list], encoding: Encoding) -> dict[str, list]:
    """``prompt + target + EOS`` with labels on the target only; just the prompt where there is no reference.

    The source is truncated inside the prompt, so the instruction and the answer cue after it always
    survive truncation.
    """
    tok = encoding.tokenizer
    head = tok(encoding.prompt_head, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        head = [tok.bos_token_id] + head  # the tokenizer would add BOS to a whole prompt
    tail = tok(encoding.prompt_tail, add_special_tokens=False)["input_ids"]
    room = max(encoding.max_source_length - len(head) - len(tail), 1)
    sources = tok(encoding.columns.sources(batch), add_special_tokens=False)["input_ids"]
    prompts = [head + ids[:room] + tail for ids in sources]
    references = encoding.columns.references(batch)
    if references is None:
        return {"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts]}
    targets = tok([refs[0] if refs else "" for refs in references], add_special_tokens=False)["input_ids"]
    targets = [ids[: encoding.max_target_length] + [tok.eos_token_id] for ids in targets]
    input_ids = [p + t for p, t in zip(prompts, targets, strict=True)]
    return {
        "input_ids": input_ids,
        "attention_mask": [[1] * len(ids) for ids in input_ids],
        "labels": [[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, targets, strict=True)],
    }


def prompt_around_source(tokenizer: PreTrainedTokenizerBase, instruction: str, cue: str) -> tuple[str, str]:
    """(text before, text after) the source: the tokenizer's chat template when it has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{instruction}\n\n{SOURCE_MARK}"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(rendered, str) and rendered.count(SOURCE_MARK) == 1:
            head, tail = rendered.split(SOURCE_MARK)
            return head, tail
    return f"{instruction}\n\n", f"\n\n{cue}\n"
