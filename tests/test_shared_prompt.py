"""A decoder's evaluation batch: one forward gives the loss and the KV cache generate starts from.

The shared path (``finetune.generation.shared_prompt``) must give the loss and the greedy outputs of the two
separate forwards it replaces, on every decoder kind (Llama: rotary positions; GPT-2: learned absolute
positions, no pad token of its own), with and without a LoRA adapter, and must fall back where the cache
cannot be handed over (beam search).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.generation import IGNORE_INDEX, left_padded_prompts
from finetune.generation.shared_prompt import generation_positions, prompt_aligned


def uneven_rows(path: Path) -> Path:
    """Documents of 1 to 40 words and summaries of 1 to 9, so prompts and targets both differ in length."""
    words = "the model reads a short text and writes what it says in fewer words".split()
    rows = [{"document": " ".join(words[: (7 * i) % 13 + 1] * (i % 3 + 1)), "summary": " ".join(words[: i % 9 + 1])}
            for i in range(10)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluation_trainer(arch: str, tiny_model_dir, tmp_path: Path, *extra: str):
    from finetune.config import parse_run_config
    from finetune.pipeline import build_task, tokenized_splits, trainable_model

    rows = uneven_rows(tmp_path / "rows.jsonl")
    config = parse_run_config(None, [
        "--task", "summarization", "--model_name_or_path", str(tiny_model_dir(arch)), "--train_file", str(rows),
        "--validation_split_percentage", "50", "--output_dir", str(tmp_path / "run"), "--max_seq_length", "64",
        "--max_target_length", "12", "--max_new_tokens", "8", "--per_device_eval_batch_size", "5",
        "--report_to", "none", *extra,
    ])
    task = build_task(config)
    raw, tokenized, tokenizer = tokenized_splits(task, config)
    model = trainable_model(task.load_model(tokenizer), config)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter adds nothing (B = 0); a trained one does
            param.data.normal_(std=0.5)
    trainer = task.build_trainer(model, tokenizer, None, tokenized["validation"], [])
    batch = next(iter(trainer.get_eval_dataloader()))
    return trainer, batch


def forward_widths(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The sequence width of every forward of the innermost decoder stack, as it runs."""
    widths: list[int] = []
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = causal_lm.base_model  # LlamaModel, GPT2Model: what every forward of the causal LM goes through

    def record(module, args, kwargs):
        ids = next(v for v in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if v is not None)
        widths.append(ids.shape[1])

    return widths, stack.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize(("arch", "extra"), [
    pytest.param("llama", [], id="llama"),
    pytest.param("gpt2", [], id="gpt2"),  # learned absolute positions, no pad token of its own
    pytest.param("llama", ["--use_peft", "true"], id="llama-lora"),
    pytest.param("gpt2", ["--use_peft", "true"], id="gpt2-lora"),
    pytest.param("llama", ["--chunked_loss", "false"], id="llama-full-logits"),  # the model's own loss
    pytest.param("gpt2", ["--label_smoothing_factor", "0.1"], id="gpt2-smoothing"),
    pytest.param("llama", ["--chunked_loss", "false", "--label_smoothing_factor", "0.1"],
                 id="llama-label-smoother"),  # the Trainer's LabelSmoother over the full logits
    pytest.param("llama", ["--bf16", "true", "--use_peft", "true"], id="llama-bf16-lora"),  # a bf16 cache
])
def test_shared_forward_gives_the_separate_loss_and_outputs(arch, extra, tiny_model_dir, tmp_path: Path) -> None:
    trainer, batch = evaluation_trainer(arch, tiny_model_dir, tmp_path, *extra)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: the padding really moves
    model = trainer.model.eval()
    widths, hook = forward_widths(model)
    try:
        trainer.share_prompt_forward = False
        apart = trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
        apart_widths, widths[:] = list(widths), []
        trainer.share_prompt_forward = True
        shared = trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
    finally:
        hook.remove()
    real = batch["attention_mask"].bool()
    prompt_width = int((real & (batch["labels"] == IGNORE_INDEX)).sum(-1).max())
    target_width = int((real & (batch["labels"] != IGNORE_INDEX)).sum(-1).max())
    # apart: loss forward, generate's prefill over the prompts, then one token a step
    assert apart_widths[:2] == [batch["input_ids"].shape[1], prompt_width] and set(apart_widths[2:]) == {1}
    # shared: one forward over prompt + target, then generate feeds the last prompt token and one token a step
    assert widths[0] == prompt_width + target_width and set(widths[1:]) == {1}
    assert len(widths) == len(apart_widths)  # the same steps; the first of generate is one token wide, not P
    assert shared[0].item() == pytest.approx(apart[0].item(), rel=1e-5)
    assert torch.equal(shared[1], apart[1])
    assert torch.equal(shared[2], apart[2])


@pytest.mark.parametrize(("arch", "extra"), [
    pytest.param("llama", ["--num_beams", "2"], id="beam-search"),  # beams copy the cache per beam
    pytest.param("mistral", [], id="sliding-window"),  # the cache keeps only the last positions
])
def test_where_the_cache_cannot_be_handed_over_generate_prefills(arch, extra, tiny_model_dir, tmp_path) -> None:
    """The loss forward's cache is not handed over; the outputs stay the same."""
    trainer, batch = evaluation_trainer(arch, tiny_model_dir, tmp_path, *extra)
    model = trainer.model.eval()
    widths, hook = forward_widths(model)
    try:
        shared = trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
        trainer.share_prompt_forward = False
        apart = trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
    finally:
        hook.remove()
    prompt_width = int(((batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()).sum(-1).max())
    assert widths.count(prompt_width) == 2  # each call ran generate's own prefill
    assert shared[0].item() == pytest.approx(apart[0].item(), rel=1e-5)
    assert torch.equal(shared[1], apart[1])


def test_prompt_aligned_layout() -> None:
    """Prompts end in one column, left-padded as generate wants them; targets follow, right-padded."""
    pad = 0
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 8, 0, 0, 0], [4, 4, 4, 4, 9, 9]])
    mask = (ids != 0).long()
    labels = torch.tensor([
        [-100, -100, -100, 8, 9, -100], [-100, -100, 8, -100, -100, -100], [-100, -100, -100, -100, 9, 9],
    ])
    batch = prompt_aligned(ids, mask, labels, pad)
    assert batch.prompt_width == 4
    assert batch.input_ids.tolist() == [[0, 5, 6, 7, 8, 9], [0, 0, 5, 6, 8, 0], [4, 4, 4, 4, 9, 9]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [
        [-100, -100, -100, -100, 8, 9], [-100, -100, -100, -100, 8, -100], [-100, -100, -100, -100, 9, 9],
    ]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3, 4], [0, 0, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    left_ids, left_mask = left_padded_prompts(ids, mask, labels, pad)
    assert torch.equal(batch.prompt_ids, left_ids) and torch.equal(batch.prompt_mask, left_mask)
    assert torch.equal(generation_positions(left_mask), batch.position_ids[:, :4])
