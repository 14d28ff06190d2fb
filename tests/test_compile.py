"""torch.compile only where it pays: the per-run decision, and how a compiled run compiles (regional, dynamic)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_settings import family_argv

from finetune import compile as compile_module
from finetune import pipeline
from finetune.compile import CompileCost, compile_decision, planned_steps
from finetune.config import parse_run_config


def test_break_even_is_compile_time_over_the_saving_per_step() -> None:
    assert CompileCost(30.0, 0.5, 0.3, "x").break_even_steps() == pytest.approx(150)
    assert math.isinf(CompileCost(30.0, 0.3, 0.4, "x").break_even_steps())  # compiled steps slower: never pays


def test_decision_follows_the_measured_break_even(monkeypatch) -> None:
    monkeypatch.setitem(compile_module.MEASURED, "fastdevice", CompileCost(30.0, 0.5, 0.3, "a test"))
    assert compile_decision(151, "fastdevice")[0] is True
    on, reason = compile_decision(150, "fastdevice")
    assert on is False and "break-even 150" in reason and reason.startswith("off")
    on, reason = compile_decision(10**9, "cpu/fp32")  # measured: compiled CPU steps were slower than eager
    assert on is False and "never pays" in reason and "--torch_compile true" in reason
    on, reason = compile_decision(10**9, "tpu")
    assert on is False and "not been measured on tpu" in reason


def test_planned_steps_counts_epochs_batches_accumulation_and_processes() -> None:
    args = SimpleNamespace(max_steps=-1, per_device_train_batch_size=16, world_size=1, gradient_accumulation_steps=1,
                           num_train_epochs=5)
    assert planned_steps(args, 3668) == 230 * 5  # MRPC: 229 full batches + 1
    args.gradient_accumulation_steps, args.world_size = 2, 2
    assert planned_steps(args, 3668) == math.ceil(math.ceil(3668 / 32) / 2) * 5
    args.max_steps = 7
    assert planned_steps(args, 3668) == 7


def saved(out: Path) -> dict:
    return yaml.safe_load((out / "finetune_config.yaml").read_text())


def test_an_unset_torch_compile_is_decided_logged_and_saved(tiny_model_dir, tmp_path, caplog) -> None:
    out = tmp_path / "run"
    config = parse_run_config(None, family_argv("glue", tiny_model_dir("bert"), out))
    assert config.training.torch_compile is None  # not decided before the data says how many steps
    with caplog.at_level(logging.WARNING, logger="finetune"):
        trainer = pipeline.prepare_training(config).trainer
    decision = [r.getMessage() for r in caplog.records if r.getMessage().startswith("torch.compile")]
    assert decision == ["torch.compile " + compile_decision(1, "cpu/fp32")[1]]  # the suite's CPU: no bf16 units
    assert trainer.args.torch_compile is False and saved(out)["training"]["torch_compile"] is False
    assert not isinstance(trainer.model.bert.encoder.layer[0], torch._dynamo.eval_frame.OptimizedModule)


def test_an_explicit_setting_is_kept_without_a_decision(tiny_model_dir, tmp_path, caplog) -> None:
    config = parse_run_config(None, [*family_argv("glue", tiny_model_dir("bert"), tmp_path / "r"),
                                     "--torch_compile", "false"])
    with caplog.at_level(logging.WARNING, logger="finetune"):
        trainer = pipeline.prepare_training(config).trainer
    assert trainer.args.torch_compile is False
    assert not [r for r in caplog.records if r.getMessage().startswith("torch.compile")]


@pytest.mark.parametrize("family, arch", [("glue", "bert"), ("summarization", "t5")])
def test_a_compiled_run_compiles_each_layer_with_dynamic_shapes(family, arch, tiny_model_dir, tmp_path) -> None:
    config = parse_run_config(None, [*family_argv(family, tiny_model_dir(arch), tmp_path / "r"),
                                     "--torch_compile", "true"])
    trainer = pipeline.prepare_training(config).trainer
    plugin = trainer.accelerator.state.dynamo_plugin
    assert trainer.args.torch_compile is True
    assert plugin.use_regional_compilation is True and plugin.dynamic is True
    assert plugin.backend.value.lower() == "inductor"


@pytest.mark.slow
def test_a_compiled_run_trains_and_new_lengths_do_not_recompile(tiny_model_dir, tmp_path) -> None:
    """Batches of four different lengths, compiled: everything is compiled during the first step, nothing after."""
    from transformers import TrainerCallback

    argv = [*family_argv("glue", tiny_model_dir("bert"), tmp_path / "r"), "--torch_compile", "true"]
    argv[argv.index("--max_steps") + 1] = "4"
    argv[argv.index("--max_train_samples") + 1] = "16"
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["frames"]
    frames.clear()
    after_step: list[int] = []

    class CountFrames(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after_step.append(frames["total"])

    run = pipeline.prepare_training(parse_run_config(None, argv))
    lengths: list[int] = []
    collate = run.trainer.data_collator
    run.trainer.data_collator = lambda rows: (lengths.append(max(len(r["input_ids"]) for r in rows)), collate(rows))[1]
    run.trainer.add_callback(CountFrames())
    result = run.trainer.train()
    assert math.isfinite(result.training_loss)
    assert len(after_step) == 4 and after_step[0] > 0
    assert after_step == [after_step[0]] * 4  # no frame compiled after the first step
    assert len(set(lengths)) > 1  # although the batches had new lengths
