"""What summarization and translation share: text-to-text fine-tuning of three kinds of model.

* encoder-decoder checkpoints (T5/mT5, BART, Marian, mBART, NLLB) load as ``AutoModelForSeq2SeqLM``;
* encoder-only checkpoints (BERT-like) are warm-started as both halves of an ``EncoderDecoderModel``
  ("bert2bert");
* decoder-only checkpoints (GPT-2, Llama/SmolLM2) learn ``prompt + target + EOS`` with the loss on the
  target only, and generate from the prompt alone, left-padded.

The kind follows from the checkpoint, so a recipe switches between them by its model setting only. A
family module (``tasks/summarization.py``, ``tasks/translation.py``) says where the source and
reference texts are, how a prompt asks for the output, which baseline to score and which metrics.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PredictionOutput

from finetune import data, generation_metrics, metrics, mirror, modeling
from finetune.batching import longest_first_order
from finetune.errors import FinetuneError
from finetune.generation.chunked_loss import HiddenStateLoss, unsupported_reason
from finetune.generation.encoding import (
    IGNORE_INDEX,
    Encoding,
    ModelKind,
    TextColumns,
    encode_batch,
    model_kind,
    prompt_around_source,
)
from finetune.generation.trainer import GenerationTrainer, TokenMeanLoss, seq2seq_arguments
from finetune.task import Task, pad_multiple

logger = logging.getLogger("finetune")


class GenerationTask(Task):
    """A text-to-text task family; subclasses say where the texts are, how to prompt, what to score."""

    #: name of the baseline, used as the prefix of its metrics (``lead_1_rouge1``)
    baseline_name: str

    def __init__(self, config):
        super().__init__(config)
        self.raw: DatasetDict | None = None

    # -- hooks ---------------------------------------------------------------------------------------------

    @abstractmethod
    def text_columns(self) -> TextColumns: ...

    @abstractmethod
    def dataset_defaults(self) -> tuple[str | None, str | None]:
        """(dataset id, config name) of the preset, or (None, None)."""

    @abstractmethod
    def prompt(self) -> tuple[str, str]:
        """(instruction, answer cue) that ask a decoder-only model for the output."""

    @abstractmethod
    def baseline_predictions(self, raw: Dataset) -> list[str]:
        """What the trivial baseline outputs for each row."""

    @abstractmethod
    def default_metrics(self) -> tuple[metrics.MetricSpec, ...]:
        """The family's evaluate modules (summaries: rouge; translations: sacrebleu and chrf)."""

    def metric_specs(self) -> tuple[metrics.MetricSpec, ...]:
        return metrics.parse_metrics(self.config.data.metric) if self.config.data.metric else self.default_metrics()

    @cached_property
    def scorer(self) -> metrics.TextScorer:
        return metrics.TextScorer(self.metric_specs(), sentence_split=generation_metrics.sentences)

    def load_metrics(self) -> None:
        self.scorer  # noqa: B018 (loads the modules)

    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
        """The run's metrics of predictions against each example's references."""
        return self.scorer(predictions, references)

    # -- data ----------------------------------------------------------------------------------------------

    def dataset_id(self) -> tuple[str | None, str | None]:
        if data.local_files(self.config.data):
            return None, None
        name, config_name = self.dataset_defaults()
        return self.config.data.dataset_name or name, self.config.data.dataset_config_name or config_name

    def load_raw_datasets(self) -> DatasetDict:
        cfg = self.config.data
        name, config_name = self.dataset_id()
        if not name and not data.local_files(cfg):
            raise FinetuneError(
                f"no data: set task_name (a {self.family} preset: {', '.join(self.presets)}), dataset_name "
                "or train_file/validation_file"
            )
        raw = data.load_raw_datasets(cfg, name, config_name)
        raw = data.with_validation_split(raw, cfg.validation_split_percentage)
        where = name or "the data files"
        columns = self.text_columns()
        data.require_columns(raw, [columns.source], where)
        labelled = DatasetDict({s: raw[s] for s in raw if s not in self.predict_splits(raw)})
        data.require_columns(labelled, [columns.reference], where)
        for split in raw:
            data.require_rows(raw[split], split, where)
        self.raw = raw
        return raw

    # -- model and features --------------------------------------------------------------------------------

    @cached_property
    def kind(self) -> ModelKind:
        """How the checkpoint generates, from its config."""
        return model_kind(self.checkpoint)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The run's tokenizer (language codes, padding side), built once; decoding uses it too."""
        model_cfg = self.config.model
        tokenizer = modeling.load_tokenizer(model_cfg)
        for attribute, code in (("src_lang", self.config.data.source_lang_code),
                                ("tgt_lang", self.config.data.target_lang_code)):
            if code is None:
                continue
            if not hasattr(tokenizer, attribute):
                raise FinetuneError(
                    f"the tokenizer of '{model_cfg.model_name_or_path}' has no language codes; drop "
                    "source_lang_code/target_lang_code (they are for mBART, NLLB and similar models)"
                )
            setattr(tokenizer, attribute, code)
        if self.kind is ModelKind.DECODER_ONLY:
            tokenizer.padding_side = "right"  # training batches; generation left-pads prompts itself
        return tokenizer

    def encoding(self, tokenizer: PreTrainedTokenizerBase) -> Encoding:
        cfg = self.config.data
        head, tail = "", ""
        if self.kind is ModelKind.DECODER_ONLY:
            head, tail = prompt_around_source(tokenizer, *self.prompt())
        return Encoding(
            tokenizer=tokenizer,
            columns=self.text_columns(),
            kind=self.kind,
            max_source_length=cfg.max_seq_length,
            max_target_length=cfg.max_target_length,
            # A prefix is how T5-style models are told the task; decoder-only models get a prompt instead.
            source_prefix=(cfg.source_prefix or "") if self.kind is not ModelKind.DECODER_ONLY else "",
            prompt_head=head,
            prompt_tail=tail,
        )

    def tokenize(self, raw: DatasetDict, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
        cfg = self.config.data
        encoding = self.encoding(tokenizer)
        tokenized = {}
        for split, dataset in raw.items():
            predicting = split in self.predict_splits(raw)
            # max_eval_samples limits only the evaluations during training (in build_trainer); the final
            # evaluation reads the whole split unless max_final_eval_samples says otherwise.
            limit = cfg.max_train_samples if split == "train" else (
                cfg.max_predict_samples if predicting else cfg.max_final_eval_samples
            )
            dataset = data.truncated(dataset, limit)
            tokenized[split] = data.tokenized(dataset, split, encode_batch, {"encoding": encoding}, cfg)
        return DatasetDict(tokenized)

    def load_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        model_cfg = self.config.model
        if self.kind is ModelKind.DECODER_ONLY:
            model = modeling.load_model(AutoModelForCausalLM, model_cfg, self.config.peft)
        elif self.kind is ModelKind.BERT2BERT and self.checkpoint.model_type != "encoder-decoder":
            model = mirror.load_or_explain(modeling.warm_started_bert2bert, model_cfg.model_name_or_path, "models")
            bert2bert_special_tokens(model, tokenizer)
        else:
            model = modeling.load_model(AutoModelForSeq2SeqLM, model_cfg, self.config.peft)
        self.configure_generation(model, tokenizer)
        return model

    def configure_generation(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """The ``generation`` settings and special tokens, on the generation_config saved with the model."""
        settings = self.config.generation
        generation = model.generation_config
        generation.max_new_tokens = settings.max_new_tokens
        generation.max_length = None  # max_new_tokens bounds the output, whatever the prompt length
        generation.num_beams = settings.num_beams
        if settings.min_new_tokens > 0:
            generation.min_new_tokens = settings.min_new_tokens
        if settings.num_beams > 1:  # only meaningful for beams; transformers warns about it otherwise
            generation.length_penalty = settings.length_penalty
        if settings.no_repeat_ngram_size > 0:
            generation.no_repeat_ngram_size = settings.no_repeat_ngram_size
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        if model.config.pad_token_id is None and hasattr(model.config, "pad_token_id"):
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.kind is ModelKind.DECODER_ONLY:
            # Targets end with the tokenizer's EOS (SmolLM2-Instruct: <|im_end|>), so that is where outputs stop.
            generation.eos_token_id = tokenizer.eos_token_id
            generation.pad_token_id = tokenizer.pad_token_id
        forced = self.config.data.forced_bos_token or self.config.data.target_lang_code
        if forced is not None:
            forced_id = tokenizer.convert_tokens_to_ids(forced)
            if forced_id is None or forced_id == tokenizer.unk_token_id:
                raise FinetuneError(f"forced_bos_token '{forced}' is not a token of the tokenizer")
            generation.forced_bos_token_id = forced_id

    def data_collator(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> Any:
        multiple = pad_multiple(self.config)
        # The model builds decoder_input_ids from the labels (encoder-decoder kinds).
        seq2seq_model = model if self.kind is not ModelKind.DECODER_ONLY else None
        return DataCollatorForSeq2Seq(
            tokenizer, model=seq2seq_model, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=multiple
        )

    # -- training, generation and metrics ------------------------------------------------------------------

    def build_trainer(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_dataset: Dataset | None,
        eval_dataset: Dataset | dict[str, Dataset] | None,
        callbacks: list[TrainerCallback],
    ) -> Trainer:
        limit = self.config.data.max_eval_samples
        if isinstance(eval_dataset, dict):
            eval_dataset = {split: data.truncated(d, limit) for split, d in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = data.truncated(eval_dataset, limit)
        return super().build_trainer(model, tokenizer, train_dataset, eval_dataset, callbacks)

    def trainer(self, **kwargs: Any) -> Trainer:
        args = seq2seq_arguments(self.config.trainer_arguments())
        decoder_only = self.kind is ModelKind.DECODER_ONLY
        loss = self.loss_function(kwargs.get("model"), args)
        return GenerationTrainer(
            args=args, decoder_only=decoder_only, padding_free=self.padding_free(), compute_loss_func=loss, **kwargs,
        )

    def loss_function(self, model: Any, args: TrainingArguments) -> Any:
        """The Trainer's ``compute_loss_func``: the chunked loss of ``finetune.generation.chunked_loss`` for a
        decoder (where it applies), the token-mean loss for encoder-decoder kinds."""
        if self.kind is not ModelKind.DECODER_ONLY:
            return TokenMeanLoss(args.label_smoothing_factor)
        if not self.config.training.chunked_loss or model is None:
            return None  # the model's own ForCausalLMLoss, normalised by num_items_in_batch
        sharded = bool(args.fsdp) or args.deepspeed is not None or os.environ.get("ACCELERATE_USE_FSDP") == "true"
        reason = "its head weights are sharded (FSDP/DeepSpeed)" if sharded else unsupported_reason(model)
        if not reason and args.world_size > 1:
            # The chunks run the head outside DDP's forward: DDP's gradient hooks then fire more than once per
            # step ("marked as ready twice"), and with static_graph the step differs from one process's
            # (tests/test_loss_scaling.py: 2 processes must take 1 process's step).
            reason = f"{args.world_size} processes (DDP reduces the head's gradient once per forward)"
        if reason:
            logger.info("chunked loss off: %s; the loss comes from the full logits", reason)
            return None
        return HiddenStateLoss(model, args.label_smoothing_factor)

    def padding_free(self) -> bool:
        if self.config.training.padding_free and self.kind is not ModelKind.DECODER_ONLY:
            raise FinetuneError(f"padding_free needs a decoder-only model; this one is {self.kind.value}")
        if self.config.training.padding_free and self.config.training.use_cache:
            # transformers keeps packed examples apart (by position_ids) only when no KV cache is built.
            raise FinetuneError("padding_free needs use_cache false: with a cache, packed examples see each other")
        return self.config.training.padding_free

    def decode(self, token_ids: np.ndarray) -> list[str]:
        ids = np.where(token_ids < 0, self.tokenizer.pad_token_id, token_ids)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        """Scores during training, against the tokenized (first) reference: enough to pick the best checkpoint."""
        predictions = self.decode(as_token_ids(prediction.predictions))
        references = [[text] for text in self.decode(np.asarray(prediction.label_ids))]
        scores = {k: v for k, v in self.score(predictions, references).items() if not isinstance(v, str)}
        scores["gen_len"] = generation_metrics.mean_length(as_token_ids(prediction.predictions),
                                                           self.tokenizer.all_special_ids)
        return scores

    def predict(self, trainer: Trainer, dataset: Dataset, split: str) -> PredictionOutput:
        """Generate for a whole split (longest first, to batch similar lengths) and score against raw references.

        The final scores use every reference of an example, untruncated, and the baseline is scored by the
        same function on the same rows.
        """
        order = longest_first_order(dataset)
        scoring, trainer.compute_metrics = trainer.compute_metrics, None
        try:
            output = trainer.predict(dataset.select(order), metric_key_prefix="eval")
        finally:
            trainer.compute_metrics = scoring
        restore = np.argsort(order)
        token_ids = as_token_ids(output.predictions)[restore]
        label_ids = None if output.label_ids is None else np.asarray(output.label_ids)[restore]
        metrics = dict(output.metrics or {})
        splits = self.raw if self.raw is not None else self.load_raw_datasets()  # references, untruncated
        raw = splits[split].select(range(len(dataset))) if split in splits else None
        references = self.text_columns().references(raw[:]) if raw is not None else None
        if references is not None:
            predictions = self.decode(token_ids)
            metrics.update({f"eval_{k}": v for k, v in self.score(predictions, references).items()})
            metrics["eval_gen_len"] = generation_metrics.mean_length(token_ids, self.tokenizer.all_special_ids)
            baseline = self.score(self.baseline_predictions(raw), references)
            metrics.update({f"eval_{self.baseline_name}_{k}": v for k, v in baseline.items() if "signature" not in k})
            metrics["eval_examples"] = len(predictions)
        return PredictionOutput(predictions=token_ids, label_ids=label_ids, metrics=metrics)

    def prediction_records(self, raw: Dataset, output: PredictionOutput) -> list[dict[str, Any]]:
        rows = raw.select(range(len(output.predictions)))[:]
        columns = self.text_columns()
        references = columns.references(rows)
        baseline = self.baseline_predictions(raw.select(range(len(output.predictions))))
        records = []
        for i, (source, prediction) in enumerate(zip(columns.sources(rows), self.decode(output.predictions),
                                                     strict=True)):
            record: dict[str, Any] = {"index": i, "source": source}
            if references is not None:
                record["references"] = references[i]
            record["prediction"] = prediction
            record["baseline"] = baseline[i]  # the trivial answer (lead-1, copy-source), beside the model's
            records.append(record)
        return records

    def predictions_file(self, split: str) -> str:
        return "generated_predictions.jsonl" if split == "validation" else f"generated_predictions_{split}.jsonl"


def as_token_ids(predictions: Any) -> np.ndarray:
    predictions = predictions[0] if isinstance(predictions, tuple) else predictions
    return np.asarray(predictions)


def bert2bert_special_tokens(model: EncoderDecoderModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """A warm-started BERT decoder starts from [CLS], stops at [SEP] and pads with [PAD].

    EncoderDecoderModel has no such defaults; without them it cannot shift labels into decoder inputs,
    and generation never stops (or stops at once), giving empty text.
    """
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise FinetuneError("bert2bert needs a tokenizer with [CLS] and [SEP] tokens (a BERT-style checkpoint)")
    tokens = {
        "decoder_start_token_id": tokenizer.cls_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for name, value in tokens.items():
        setattr(model.config, name, value)
        setattr(model.generation_config, name, value)
    model.config.vocab_size = model.config.decoder.vocab_size
