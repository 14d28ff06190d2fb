"""Decoder-only generation while the parameters are sharded (FSDP, DeepSpeed ZeRO-3).

Every rank then holds a slice of the weights and each forward gathers the rest from the other ranks. A rank
whose prompts finish early must keep joining those gathers until all ranks are done (``synced_gpus``), or the
others wait forever. Seq2SeqTrainer sets it for encoder-decoder models; finetune's decoder-only
``prediction_step`` must do the same. The sharding is patched here (one CPU process cannot shard); the FSDP
run on GPUs covers it end to end.
"""

from __future__ import annotations

import pytest
from conftest import SAMPLES

import finetune.generation.trainer as generation_trainer
from finetune.config import parse_run_config
from finetune.pipeline import load_for_inference

WMT = SAMPLES / "wmt16_en_ro_sample"


@pytest.fixture(scope="module")
def decoder_only(tiny_model_dir):
    config = parse_run_config(None, [
        "--task", "translation", "--model_name_or_path", str(tiny_model_dir("llama")),
        "--validation_file", str(WMT / "val.jsonl"), "--source_lang", "en", "--target_lang", "ro",
        "--max_new_tokens", "3", "--per_device_eval_batch_size", "2", "--report_to", "none",
    ])
    task, trainer, raw, tokenized = load_for_inference(config)
    assert trainer.decoder_only
    rows = tokenized["validation"].select(range(3))
    return trainer, trainer.data_collator([rows[i] for i in range(len(rows))])


@pytest.mark.parametrize(
    ("fsdp", "deepspeed", "zero3", "synced"),
    [
        (False, False, False, False),  # one process or plain data parallel: every rank has all the weights
        (True, False, False, True),  # FSDP
        (False, True, True, True),  # DeepSpeed ZeRO-3
        (False, True, False, False),  # DeepSpeed ZeRO-2 shards optimizer state and gradients, not weights
    ],
)
def test_decoder_only_generation_syncs_ranks_when_parameters_are_sharded(
    decoder_only, monkeypatch, fsdp: bool, deepspeed: bool, zero3: bool, synced: bool
) -> None:
    trainer, batch = decoder_only
    monkeypatch.setattr(trainer, "is_fsdp_enabled", fsdp)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", deepspeed)
    monkeypatch.setattr(generation_trainer, "is_deepspeed_zero3_enabled", lambda: zero3, raising=False)
    seen: list[object] = []
    generate = trainer.model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs.pop("synced_gpus", "not passed"))
        return generate(*args, **kwargs)  # one process: no other rank to sync with

    monkeypatch.setattr(trainer.model, "generate", recording_generate)
    # The step itself: evaluation_loop would set up DeepSpeed, which is not installed here.
    loss, generated, labels = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=False)
    assert seen == [synced]
    assert generated.shape == (3, 3) and loss is not None  # 3 rows, max_new_tokens 3
