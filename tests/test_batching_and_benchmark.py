"""Length-bucketed batching, in-order evaluation, and the throughput benchmark's pieces on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.batching import LengthBucketSampler
from finetune.config import parse_run_config
from finetune.pipeline import build_task, tokenized_splits

ROOT = Path(__file__).resolve().parents[1]


def padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_bucket_sampler_sorts_globally_and_shuffles_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=203).tolist()
    sampler = LengthBucketSampler(8, lengths, window=0, generator=torch.Generator().manual_seed(1))
    order = list(sampler)
    assert sorted(order) == list(range(203))  # a permutation: every example once
    batches = [order[s : s + 8] for s in range(0, 203, 8)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    assert len(batches[-1]) == 203 % 8  # the partial batch stays last, so the DataLoader cuts the same batches
    # a global sort pads no more than any windowed grouping, and batch order is not simply descending
    windowed = list(LengthBucketSampler(8, lengths, window=2, generator=torch.Generator().manual_seed(1)))
    assert padded_tokens(order, lengths, 8) <= padded_tokens(windowed, lengths, 8)
    maxima = [max(lengths[i] for i in b) for b in batches[1:-1]]
    assert maxima != sorted(maxima, reverse=True)
    assert list(LengthBucketSampler(8, lengths, 0, torch.Generator().manual_seed(2))) != order  # reshuffled


def glue_trainer(model_dir: Path, tmp_path: Path, **overrides):
    config = parse_run_config(
        "glue-mrpc",
        overrides={
            "model_name_or_path": str(model_dir),
            "max_train_samples": 64,
            "max_eval_samples": 48,
            "output_dir": str(tmp_path / "run"),
            "report_to": "none",
            "per_device_eval_batch_size": 8,
            "eval_strategy": "no",
            "load_best_model_at_end": False,
            **overrides,
        },
    )
    task = build_task(config)
    _, tokenized, tokenizer = tokenized_splits(task, config)
    model = task.load_model(tokenizer)
    return task, task.build_trainer(model, tokenizer, tokenized["train"], None, []), tokenized


def test_predictions_keep_dataset_order_under_group_by_length(tiny_model_dir, tmp_path):
    """transformers groups eval batches by length too; finetune's Trainer must not reorder predictions."""
    task, trainer, tokenized = glue_trainer(tiny_model_dir("bert"), tmp_path)
    assert trainer.args.train_sampling_strategy == "group_by_length"  # the default
    validation = tokenized["validation"]
    lengths = [len(ids) for ids in validation["input_ids"]]
    assert len(set(lengths)) > 8  # varied lengths: a length-grouped order would differ from the dataset's
    got = task.predict(trainer, validation, "validation").predictions
    trainer.args.train_sampling_strategy = "sequential"  # same model, plainly in order
    expected = task.predict(trainer, validation, "validation").predictions
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_group_by_length_window_zero_uses_the_bucket_sampler(tiny_model_dir, tmp_path):
    _, trainer, _ = glue_trainer(tiny_model_dir("bert"), tmp_path, group_by_length_window=0)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthBucketSampler) and sampler.window == 0
    assert sorted(sampler) == list(range(64))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_runs_both_arms_and_writes_its_report(tiny_model_dir, tmp_path):
    bench = load_benchmark()
    out = tmp_path / "throughput.json"
    argv = ["--rounds", "1", "--train_samples", "32", "--steps", "2", "--eval_samples", "16", "--skip_steps", "1",
            "--model", str(tiny_model_dir("bert")), "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"baseline", "finetune", "plain_trainer"}
    base, ours = report["summary"]["baseline"], report["summary"]["finetune"]
    for row in (base, ours):
        assert row["optimizer_steps"] == 2 and row["train_samples"] == 2 * 16  # the recipe's batch 16
        assert row["train_samples_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert 0 <= row["eval_metrics"]["f1"] <= 1 and row["eval_samples"] == 16
    assert base["padding_fraction"] > 0.5 > ours["padding_fraction"]  # padded to 128 vs per batch
    assert report["ratios_vs_baseline"]["baseline"]["train_samples_per_s"] == pytest.approx(1.0)
    assert report["ratios_vs_plain_trainer"]["plain_trainer"]["train_samples_per_s"] == pytest.approx(1.0)
    assert len(report["runs"]) == 3 and report["machine"]["load_average_before"]


def test_benchmark_arm_counts_real_and_padded_tokens(tiny_model_dir, tmp_path):
    """One arm in process: exact step and sample counts, and the padding of run_glue's pad-to-128."""
    bench = load_benchmark()
    opts = bench.main.__globals__["argparse"].Namespace(
        model_path=str(tiny_model_dir("bert")), train_samples=32, eval_samples=16, steps=2, skip_steps=1, bf16=False
    )
    result = bench.run_arm("baseline", 0, opts)
    assert result.optimizer_steps == 2 and result.train_samples == 2 * 16  # the recipe's batch 16
    assert result.padding_fraction > 0.5  # MRPC pairs average ~53 tokens, padded to 128
    assert result.real_tokens_per_s < result.train_samples_per_s * 128
    assert result.eval_samples == 16 and set(result.eval_metrics) == {"f1", "accuracy"}


def test_plain_trainer_arm_is_a_plain_trainer_with_the_recipe_hyperparameters(tiny_model_dir, tmp_path):
    """Arm (c): transformers' own Trainer class, dynamic padding, length-grouped batches, fused AdamW."""
    bench = load_benchmark()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plain_trainer import build_trainer
    from transformers import Trainer

    trainer = build_trainer(str(tiny_model_dir("bert")), 32, 16, max_steps=2, output_dir=str(tmp_path / "plain"))
    assert type(trainer) is Trainer
    args = trainer.args
    assert (args.train_sampling_strategy, args.optim) == ("group_by_length", "adamw_torch_fused")
    assert (args.learning_rate, args.per_device_train_batch_size, args.warmup_steps, args.weight_decay) == (
        1e-4, 16, 0.1, 0.01
    )
    opts = bench.main.__globals__["argparse"].Namespace(
        model_path=str(tiny_model_dir("bert")), train_samples=32, eval_samples=16, steps=2, skip_steps=1, bf16=False
    )
    result = bench.run_arm("plain_trainer", 0, opts)
    assert result.optimizer_steps == 2 and result.train_samples == 2 * 16
    assert 0 < result.padding_fraction < 0.5  # padded per batch, not to 128
    assert result.eval_samples == 16 and set(result.eval_metrics) == {"f1", "accuracy"}


def test_dropout_experiments_switch_off_the_dropout_they_name(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    bench = load_benchmark()
    load = lambda: AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"))  # noqa: E731
    probabilities = lambda m: {n: d.p for n, d in m.named_modules() if isinstance(d, torch.nn.Dropout)}  # noqa: E731
    before = probabilities(load())
    attention = probabilities(bench.without_dropout(load(), "attention"))
    assert {n for n, p in attention.items() if p == 0} == {n for n in before if ".attention.self." in n} != set()
    assert all(p == before[n] > 0 for n, p in attention.items() if ".attention.self." not in n)
    assert set(probabilities(bench.without_dropout(load(), "all")).values()) == {0.0}
    assert probabilities(bench.without_dropout(load(), None)) == before


def test_classification_predicts_longest_first_and_returns_rows_in_order(tiny_model_dir, tmp_path):
    """Evaluation batches of similar length: fewer padded positions, same predictions in the dataset's order."""
    task, trainer, tokenized = glue_trainer(tiny_model_dir("bert"), tmp_path, train_sampling_strategy="sequential")
    validation = tokenized["validation"]
    padded: list[int] = []
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: (padded.append(len(rows) * max(len(r["input_ids"]) for r in rows)),
                                          collate(rows))[1]
    plain = trainer.predict(validation)  # the Trainer on its own: batches in row order
    unsorted_positions, padded[:] = sum(padded), []
    ours = task.predict(trainer, validation, "validation")
    assert sum(padded) < 0.8 * unsorted_positions
    np.testing.assert_allclose(ours.predictions, plain.predictions, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours.label_ids, plain.label_ids)
    assert ours.metrics["eval_f1"] == pytest.approx(plain.metrics["test_f1"])
    # evaluation during training gets the split longest first too (its scores do not depend on the order)
    sorted_split = task.build_trainer(trainer.model, trainer.processing_class, None, validation, []).eval_dataset
    assert [len(ids) for ids in sorted_split["input_ids"]] == sorted(map(len, validation["input_ids"]), reverse=True)


def test_benchmark_bf16_arms_and_no_evaluation_on_a_cpu(tiny_model_dir, monkeypatch):
    """Issue 23.5: the plain Trainer's bf16 arm and --bf16 run on a CPU; --eval_samples 0 evaluates nothing;
    finetune's arm computes in what finetune decides for the CPU (flags mocked: a CPU with AVX512-BF16)."""
    bench = load_benchmark()
    monkeypatch.setenv("FINETUNE_CPU_FLAGS", "avx2 avx512f avx512_bf16")
    monkeypatch.setattr("finetune.precision.accelerator_kind", lambda: None)
    namespace = bench.main.__globals__["argparse"].Namespace
    opts = namespace(model_path=str(tiny_model_dir("bert")), train_samples=32, eval_samples=0, steps=2, skip_steps=1,
                     bf16=False)
    runs = {arm: bench.run_arm(arm, 0, opts) for arm in ("finetune", "finetune+fp32", "plain_trainer_bf16")}
    assert {arm: r.settings["precision"] for arm, r in runs.items()} == {
        "finetune": "bf16", "finetune+fp32": "fp32", "plain_trainer_bf16": "bf16"}
    assert all(r.optimizer_steps == 2 and r.eval_samples == 0 and r.eval_metrics == {} for r in runs.values())
    forced = bench.run_arm("plain_trainer", 0, namespace(**{**vars(opts), "bf16": True, "eval_samples": 16}))
    assert forced.settings["precision"] == "bf16" and forced.eval_samples == 16


def test_benchmark_pad_multiple_arm_pads_to_multiples_of_8(tiny_model_dir):
    bench = load_benchmark()
    opts = bench.main.__globals__["argparse"].Namespace(
        model_path=str(tiny_model_dir("bert")), train_samples=32, eval_samples=0, steps=2, skip_steps=1, bf16=False
    )
    trainer, _validation, _evaluate = bench.finetune_trainer("finetune+pad_multiple_8", opts, [])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 8 == 0
    plain, _validation, _evaluate = bench.finetune_trainer("finetune", opts, [])
    assert plain.data_collator.pad_to_multiple_of is None  # on a CPU finetune pads to the longest row only


def test_machine_info_records_the_cpu_flags_that_decide_bf16(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import machine_info, real_cpu_flags

    monkeypatch.setenv("FINETUNE_CPU_FLAGS", "amx_bf16")  # what finetune decides from; the record shows the truth
    info = machine_info()
    assert set(info["cpu_flags"]) <= real_cpu_flags() and info["finetune_cpu_flags_override"] == "amx_bf16"
    assert info["torch_cpu_capability"] and info["torch_threads"] >= 1 and len(info["load_average"]) == 3
