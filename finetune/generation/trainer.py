"""The Trainer of generation tasks: evaluation generates, decoder-only models from the prompt alone."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from transformers import (
    DataCollatorWithFlattening,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.integrations.fsdp import is_fsdp_managed_module
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.trainer_pt_utils import LabelSmoother

from finetune.batching import FinetuneSampling
from finetune.compile import RegionalCompileMixin
from finetune.distributed import FsdpTrainerMixin
from finetune.frozen_weights import FrozenWeightsMixin, frozen_linear_weights_in
from finetune.generation.chunked_loss import HiddenStateLoss
from finetune.generation.encoding import IGNORE_INDEX
from finetune.generation.shared_prompt import cache_reusable, prompt_aligned, prompt_cache, takes_position_ids
from finetune.tokens import TokensNotPickled


def left_padded_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part of right-padded ``prompt + target`` rows (the unlabelled real tokens), left-padded."""
    keep = attention_mask.bool()
    if labels is not None:
        keep &= labels == IGNORE_INDEX
    prompts = [row[mask] for row, mask in zip(input_ids, keep, strict=True)]
    width = max(len(p) for p in prompts)
    ids = input_ids.new_full((len(prompts), width), pad_token_id)
    mask = attention_mask.new_zeros((len(prompts), width))
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = prompt
        mask[i, width - len(prompt):] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class TokenMeanLoss:
    """The Trainer's ``compute_loss_func`` for encoder-decoder kinds: summed token loss / tokens of the whole step.

    T5, BART, Marian, mBART and EncoderDecoderModel return a mean over the micro-batch and ignore the
    ``num_items_in_batch`` the Trainer hands them, yet their forward takes ``**kwargs``, so transformers 5
    treats that mean as already normalised over the step: it skips the division by the accumulation steps and
    multiplies by the process count (``average_tokens_across_devices``). Logged loss, gradients and clipping
    were then k x N too large. Normalising by ``num_items_in_batch`` (label tokens over all micro-batches and
    processes, counted by the Trainer) is what decoder-only models already do, and weights every target token
    the same however the step is cut up. Label smoothing goes through the Trainer's own LabelSmoother.
    """

    label_smoothing: float = 0.0

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
        if self.label_smoothing:
            return LabelSmoother(epsilon=self.label_smoothing)(outputs, labels, num_items_in_batch=num_items_in_batch)
        logits = outputs["logits"]
        # Labels are targets as they stand (the decoder input is shifted instead): the masked-LM form of the loss.
        return ForMaskedLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


class GenerationTrainer(FrozenWeightsMixin, RegionalCompileMixin, FsdpTrainerMixin, FinetuneSampling, Seq2SeqTrainer):
    """Seq2SeqTrainer whose evaluation generates; decoder-only models generate from the prompt alone.

    FinetuneSampling keeps evaluation batches in dataset order (transformers would group them by length at
    random), which ``GenerationTask.predict`` relies on to put predictions back against their rows.
    """

    def __init__(
        self, *args: Any, decoder_only: bool = False, padding_free: bool = False, share_prompt_forward: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.decoder_only = decoder_only
        self.padding_free = padding_free
        #: generate starts from the loss forward's KV cache where that is exact (``shared_prompt``); False runs
        #: the two forwards apart, as before (benchmarks/generation_phases.py times both)
        self.share_prompt_forward = share_prompt_forward
        #: set while an evaluation batch needs its loss alone (its predictions come from generate)
        self.loss_without_logits = False
        #: under bf16 autocast, evaluation holds frozen Linear weights in bf16 instead of casting them at every
        #: forward (``frozen_linear_weights_in``); False casts them as autocast does (benchmarks compare both)
        self.frozen_weights_in_bf16 = True

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        with frozen_linear_weights_in(self.model, self.evaluation_weight_dtype()):
            return super().evaluation_loop(*args, **kwargs)

    def evaluation_weight_dtype(self) -> torch.dtype | None:
        """bf16 where evaluation runs under bf16 autocast on whole (unsharded) weights; None: leave them."""
        bf16 = self.accelerator.mixed_precision == "bf16" and not self.args.bf16_full_eval
        return torch.bfloat16 if bf16 and self.frozen_weights_in_bf16 and not self.parameters_sharded() else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chunked = isinstance(self.compute_loss_func, HiddenStateLoss)
        if not chunked or not (model.training or self.loss_without_logits):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The chunks run after the model's forward, outside the autocast accelerate puts around it.
        with self.compute_loss_func.training(), self.accelerator.autocast():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_train_dataloader(self):
        if not self.padding_free:
            return super().get_train_dataloader()
        # Only training batches are flattened: generation needs left-padded prompts.
        padded, self.data_collator = self.data_collator, DataCollatorWithFlattening()
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = padded

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        # Accelerate autocasts the prepared model's forward only; generate reaches the forward of the model
        # inside it (peft's base model, the unwrapped module), which computed in fp32 beside a bf16 training.
        with self.accelerator.autocast():
            return self.precision_prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)

    def precision_prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """(loss, generated tokens, labels) of one evaluation batch, in the run's precision."""
        if not self.decoder_only or prediction_loss_only or not self.args.predict_with_generate:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        pad = self.model.generation_config.pad_token_id
        if labels is not None and self.share_prompt_forward and takes_position_ids(self.model):
            loss, prompt_ids, prompt_mask, start = self.loss_and_prompt_cache(model, inputs, pad)
        else:
            loss, start = (None if labels is None else self.evaluation_loss(model, inputs)), {}
            prompt_ids, prompt_mask = left_padded_prompts(inputs["input_ids"], inputs["attention_mask"], labels, pad)
        with torch.no_grad(), self.full_parameters():
            generated = self.model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, synced_gpus=self.parameters_sharded(), **start
            )
        return loss, generated[:, prompt_ids.shape[1]:], labels

    def evaluation_loss(self, model, inputs) -> torch.Tensor:
        """The teacher-forced loss of a decoder batch as laid out (right-padded), from its own forward."""
        with self.chunked_evaluation_loss():
            loss, _, _ = Trainer.prediction_step(self, model, inputs, True)
        return loss

    def loss_and_prompt_cache(self, model, inputs, pad_token_id: int):
        """(loss, left-padded prompt ids, their mask, generate's cache keyword), all from one forward.

        The keyword is empty where the cache cannot be handed over. transformers 5.x renamed
        ``past_key_values`` to ``cache`` (generate takes the old name until 6.0, with a warning): generate gets
        the name the output used.
        """
        batch = prompt_aligned(inputs["input_ids"], inputs["attention_mask"], inputs["labels"], pad_token_id)
        with self.chunked_evaluation_loss(), torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, batch.model_inputs(), return_outputs=True)
        name = "cache" if outputs.get("cache") is not None else "past_key_values"
        cache = outputs.get(name)
        reusable = cache_reusable(cache, self.model.generation_config) and not self.parameters_sharded()
        start = {name: prompt_cache(cache, batch)} if reusable else {}
        return loss.detach().mean(), batch.prompt_ids, batch.prompt_mask, start

    @contextlib.contextmanager
    def chunked_evaluation_loss(self):
        """Only the loss is kept, so it too comes from the hidden states in chunks: the full logits of a batch
        of 32 x 448 positions x 49152 tokens would be 2.8 GB of fp32 (11 GB peak RSS before)."""
        self.loss_without_logits = True
        try:
            yield
        finally:
            self.loss_without_logits = False

    def parameters_sharded(self) -> bool:
        """Whether each rank holds only a slice of the weights (FSDP, DeepSpeed ZeRO-3), as Seq2SeqTrainer decides.

        Then every forward gathers weights from all ranks, so a rank whose outputs are finished must go on
        taking part (``synced_gpus``) until all are, or the others hang in the gather.
        """
        zero3 = self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
        return bool(self.is_fsdp_enabled or zero3 or is_fsdp_managed_module(self.model))

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """FSDP1 only: generate calls the inner module, which cannot gather FlatParameter shards by itself."""
        if not torch.distributed.is_available():
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(self.model, FullyShardedDataParallel):
            return FullyShardedDataParallel.summon_full_params(self.model)
        return contextlib.nullcontext()


class GenerationTrainingArguments(TokensNotPickled, Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments that, like finetune's TrainConfig, never pickle the Hub token."""


def seq2seq_arguments(args: TrainingArguments) -> Seq2SeqTrainingArguments:
    """The run's TrainingArguments as the Seq2SeqTrainingArguments Seq2SeqTrainer reads, generating in eval.

    Generation settings live in the model's generation_config (the ``generation`` section), so the
    trainer's own generation_* overrides stay unset.
    """
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    converted = GenerationTrainingArguments(**values, predict_with_generate=True)
    for extra in dataclasses.fields(args):  # finetune's own training settings (group_by_length_window, ...)
        if extra.name not in base:
            setattr(converted, extra.name, getattr(args, extra.name))
    return converted
