"""Evaluation under bf16 autocast holds frozen Linear weights in bf16 instead of casting them at every forward.

``finetune.frozen_weights.frozen_linear_weights_in``: autocast caches its bf16 copy only of weights that require a
gradient, so a LoRA base (or a loaded adapter run, all frozen) was cast again for every generated token. The
change must leave the evaluation's loss and greedy outputs bit for bit as they were, on every generation kind,
and must put the original fp32 parameters (and the tied embedding) back afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_shared_prompt import evaluation_trainer, uneven_rows


def linear_weight_dtypes(model: torch.nn.Module) -> tuple[list[torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    """The dtype of every nn.Linear weight each time a forward reads it."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
             for m in model.modules() if type(m) is torch.nn.Linear]
    return seen, hooks


@pytest.mark.parametrize(("arch", "extra", "frozen_all"), [
    pytest.param("llama", ["--use_peft", "true"], False, id="llama-lora"),  # training's final evaluation
    pytest.param("llama", ["--use_peft", "true"], True, id="llama-loaded-adapter"),  # finetune evaluate: all frozen
    pytest.param("gpt2", ["--use_peft", "true"], False, id="gpt2-lora"),  # Conv1D base: left alone
    pytest.param("t5", ["--use_peft", "true"], False, id="t5-lora"),  # encoder-decoder, Seq2SeqTrainer's step
    pytest.param("llama", [], False, id="llama-full"),  # nothing frozen: nothing to do
])
def test_bf16_weights_give_autocasts_outputs_exactly(arch, extra, frozen_all, tiny_model_dir, tmp_path: Path) -> None:
    trainer, _ = evaluation_trainer(arch, tiny_model_dir, tmp_path, "--bf16", "true", *extra)
    if frozen_all:
        trainer.model.requires_grad_(False)
    before = {name: param for name, param in trainer.model.named_parameters()}
    embedding = trainer.model.get_input_embeddings().weight
    runs = {}
    for in_bf16 in (False, True):
        trainer.frozen_weights_in_bf16 = in_bf16
        seen, hooks = linear_weight_dtypes(trainer.model)
        try:
            runs[in_bf16] = trainer.predict(trainer.eval_dataset)
        finally:
            for hook in hooks:
                hook.remove()
        runs[in_bf16, "dtypes"] = set(seen)
    frozen_linears = any(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in trainer.model.modules())
    assert runs[False, "dtypes"] <= {torch.float32}
    assert (torch.bfloat16 in runs[True, "dtypes"]) == frozen_linears  # it ran on the bf16 copies where frozen
    assert frozen_linears == (frozen_all or "--use_peft" in extra)  # LoRA's base (GPT-2: its lm_head only)
    assert runs[True].metrics["test_loss"] == runs[False].metrics["test_loss"]
    assert (runs[True].predictions == runs[False].predictions).all()
    after = dict(trainer.model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same objects
    assert all(p.dtype == torch.float32 for p in after.values())
    assert trainer.model.get_input_embeddings().weight is embedding
    output = trainer.model.get_output_embeddings()
    if getattr(trainer.model.config, "tie_word_embeddings", False) and output is not None:
        assert output.weight is embedding  # the tie holds again


def test_fp32_evaluation_changes_nothing(tiny_model_dir, tmp_path: Path) -> None:
    trainer, _ = evaluation_trainer("llama", tiny_model_dir, tmp_path, "--bf16", "false", "--use_peft", "true")
    assert trainer.evaluation_weight_dtype() is None
    seen, hooks = linear_weight_dtypes(trainer.model)
    try:
        trainer.evaluate()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {torch.float32}


# -- LoRA training: the frozen fp32 weights leave memory for the length of train() ---------------------------

LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "all-linear"]
TRAINING_KINDS = {
    "llama": ("llama", None),  # decoder; lm_head is the output embedding: kept in fp32
    "gpt2": ("gpt2", None),  # decoder without a pad token; Conv1D layers, not Linear: nothing to release
    "t5": ("t5", None),  # encoder-decoder whose feed-forward reads wo's dtype: left in fp32 (READS_WEIGHT_DTYPE)
    "bart": ("bart", None),  # encoder-decoder
    "bert-mrpc": ("bert", "glue-mrpc"),  # encoder with token_type_ids; a new head, trained in full
    "distilbert-mrpc": ("distilbert", "glue-mrpc"),  # encoder without token_type_ids
}


class FrozenLinearDtypes:
    """A callback: the dtypes of the frozen Linear weights at the end of each training step."""

    def __init__(self):
        from transformers import TrainerCallback

        self.seen: set[torch.dtype] = set()
        recorder = self

        class Recorder(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                recorder.seen |= {m.weight.dtype for m in model.modules()
                                  if type(m) is torch.nn.Linear and not m.weight.requires_grad}

        self.callback = Recorder()


def lora_training(kind: str, tiny_model_dir, run: Path, release: bool, *extra: str, bf16_values: bool = False):
    """(trainer after 3 steps, {name: (parameter, its values before)} of the frozen ones, dtypes seen)."""
    from transformers import set_seed

    from finetune.config import parse_run_config
    from finetune.pipeline import build_task, tokenized_splits, trainable_model

    arch, preset = TRAINING_KINDS[kind]
    data = [] if preset else ["--task", "summarization", "--train_file", str(uneven_rows(run.parent / "rows.jsonl")),
                              "--max_target_length", "12"]
    config = parse_run_config(preset, [
        *data, "--model_name_or_path", str(tiny_model_dir(arch)), "--output_dir", str(run), "--max_seq_length", "64",
        "--max_train_samples", "16", "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate",
        "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--bf16", "true", "--use_cpu", "true", *LORA, *extra,
    ])
    task = build_task(config)
    raw, tokenized, tokenizer = tokenized_splits(task, config)
    set_seed(config.training.seed)
    model = trainable_model(task.load_model(tokenizer), config)
    if bf16_values:  # as a checkpoint stored in bf16 loads
        for param in model.parameters():
            param.data = param.data.bfloat16().float()
    frozen = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    dtypes = FrozenLinearDtypes()
    trainer = task.build_trainer(model, tokenizer, tokenized["train"], None, [dtypes.callback])
    trainer.release_frozen_weights = release
    trainer.train()
    return trainer, frozen, dtypes.seen


def trained_values(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(TRAINING_KINDS))
def test_lora_training_with_bf16_frozen_weights_is_autocasts_training_exactly(kind, tiny_model_dir, tmp_path):
    from finetune.frozen_weights import releasable_linear_parameters

    runs = {}
    for release in (False, True):
        runs[release] = lora_training(kind, tiny_model_dir, tmp_path / f"release-{release}", release)
    (kept, _, kept_dtypes), (released, frozen, released_dtypes) = runs[False], runs[True]
    losses = {r: [e["loss"] for e in t.state.log_history if "loss" in e] for r, (t, _, _) in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == losses[False]
    before, after = trained_values(kept), trained_values(released)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    releasable = len(releasable_linear_parameters(released.model)) if released.training_weight_dtype() else 0
    assert (releasable > 0) == (kind not in ("gpt2", "t5"))  # GPT-2: Conv1D layers and the tied lm_head
    counts = released.released_frozen_weights
    assert counts["exact"] + counts["spilled"] == releasable
    assert (counts["spilled"] > 0) == (releasable > 0)  # random fp32 weights: bf16 does not hold them
    assert kept_dtypes == {torch.float32}
    held = {id(p) for p in releasable_linear_parameters(released.model)} if releasable else set()
    expected = {torch.bfloat16 if id(m.weight) in held else torch.float32  # an lm_head, T5's layers: fp32
                for m in released.model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    assert released_dtypes == expected and (torch.bfloat16 in expected) == (releasable > 0)
    after_training = dict(released.model.named_parameters())
    for name, (param, values) in frozen.items():  # the same objects, fp32 again, bit for bit
        assert after_training[name] is param and param.dtype == torch.float32 and torch.equal(param, values), name
    assert not list(Path(released.args.output_dir).glob(".frozen-fp32-*"))  # the spill file is gone


def test_weights_bf16_holds_exactly_come_back_without_a_file(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from finetune import frozen_weights

    def no_spill(tensors, directory):
        raise AssertionError(f"spilled {len(tensors)} tensors")

    monkeypatch.setattr(frozen_weights, "spilled", no_spill)
    trainer, frozen, dtypes = lora_training("llama", tiny_model_dir, tmp_path / "run", True, bf16_values=True)
    assert trainer.released_frozen_weights["spilled"] == 0 and trainer.released_frozen_weights["exact"] > 0
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 and torch.equal(p, values) for p, values in frozen.values())


@pytest.mark.parametrize(("extra", "why"), [
    (["--bf16", "false"], "fp32: no autocast"),
    (["--use_dora", "true"], "DoRA reads the base weight outside the products"),
])
def test_frozen_weights_stay_fp32_where_it_does_not_apply(extra, why, tiny_model_dir, tmp_path) -> None:
    trainer, frozen, dtypes = lora_training("llama", tiny_model_dir, tmp_path / "run", True, *extra)
    assert trainer.training_weight_dtype() is None, why
    assert trainer.released_frozen_weights == {"exact": 0, "spilled": 0}
    assert dtypes == {torch.float32}


@pytest.mark.distributed
def test_two_processes_train_lora_on_bf16_frozen_weights(tiny_model_dir, tmp_path: Path) -> None:
    """DDP broadcasts every parameter from rank 0 when it wraps the model, the bf16 ones too (gloo on a CPU)."""
    from safetensors.torch import load_file
    from test_distributed import accelerate_launch

    run = tmp_path / "run"
    done = accelerate_launch([
        "train", "--task", "summarization", "--train_file", str(uneven_rows(tmp_path / "rows.jsonl")),
        "--validation_split_percentage", "50", "--model_name_or_path", str(tiny_model_dir("llama")),
        "--output_dir", str(run), "--max_seq_length", "64", "--max_target_length", "12", "--max_new_tokens", "4",
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--bf16", "true", "--use_cpu", "true", *LORA,
        "--report_to", "none", "--disable_tqdm", "true",
    ], tmp_path / "datasets-cache")
    output = done.stdout + done.stderr
    assert output.count("frozen Linear weights in bf16 only") == 2, output[-3000:]  # each rank
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    saved = load_file(str(run / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    assert not list(run.glob(".frozen-fp32-*"))
