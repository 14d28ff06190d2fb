"""QLoRA on the CPU: a LoRA adapter over 4-bit NF4 or 8-bit base weights, through bitsandbytes' CPU backend.

The runs go through the real pipeline (``finetune train``/``evaluate``/``merge``) on the tiny random-weight
Llama of tests/conftest.py, whose tokenizer has no pad token (EOS pads). What is checked: the frozen base
really is bitsandbytes' Linear4bit/Linear8bitLt while the adapter trains, the saved adapter re-evaluated from
the run folder gives exactly the metrics recorded at the end of training (so the reload quantizes the base as
training did), merging folds the adapter into the dequantized base weights (so the merged model computes
what the adapter model computes), and without bitsandbytes the settings stop with one line.

Skipped only where bitsandbytes is not installed (``pip install 'finetune[qlora]'``; the test extra has it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import read_json, read_jsonl
from safetensors.torch import load_file
from test_fault_tolerance import step_losses
from test_peft import GENERATION, LORA, SMALL, one_error

from finetune import adapters, pipeline
from finetune.cli import main

bnb = pytest.importorskip("bitsandbytes")

#: bits -> (flag, bitsandbytes layer class the frozen base weights must be)
BITS: dict[str, tuple[str, type]] = {
    "4": ("--load_in_4bit", bnb.nn.Linear4bit),
    "8": ("--load_in_8bit", bnb.nn.Linear8bitLt),
}
#: task -> (recipe, flags of `finetune train`, flags of `finetune evaluate` that batch as the run's evaluation did)
TASKS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "classification": (["glue-mrpc"], SMALL, ["--max_eval_samples", "40", "--per_device_eval_batch_size", "16"]),
    "generation": ([], GENERATION, ["--per_device_eval_batch_size", "8"]),  # summarization, decoder-only
}
#: the tiny Llama's linear layers: q, k, v, o, gate, up, down in each of its two decoder layers
BASE_LINEAR_LAYERS = 14


@dataclass
class QloraRun:
    """A finished QLoRA run and what was seen of it while it trained."""

    out: Path
    source: Path
    base_layers: list[type]  # the class of the base layer under each LoRA layer, as trained
    initial: dict[str, torch.Tensor]  # the trainable weights before the first step
    final: dict[str, torch.Tensor]  # and after training
    metrics: dict[str, Any]  # metrics.json as written at the end of training
    predictions: list[dict]  # the prediction file of the validation split, as written then


def lora_base_layers(model: Any) -> list[type]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [type(m.get_base_layer()) for m in model.modules() if isinstance(m, BaseTunerLayer)]


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_qlora(source: Path, out: Path, bits: str, task: str, *extra: str) -> QloraRun:
    """``finetune train`` with the model pipeline.trainable_model returns watched (the real pipeline)."""
    seen: dict[str, Any] = {}
    real = pipeline.trainable_model

    def watched(model: Any, config: Any) -> Any:
        seen["model"] = wrapped = real(model, config)
        seen["initial"] = trainable(wrapped)
        return wrapped

    recipe, flags, _ = TASKS[task]
    argv = ["train", *recipe, "--model_name_or_path", str(source), "--output_dir", str(out), *flags, *LORA,
            BITS[bits][0], "true", *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "trainable_model", watched)
        assert main(argv) == 0
    predictions = "predictions_validation.jsonl" if task == "classification" else "generated_predictions.jsonl"
    return QloraRun(out, source, lora_base_layers(seen["model"]), seen["initial"], trainable(seen["model"]),
                    read_json(out / "metrics.json"), read_jsonl(out / predictions))


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], QloraRun]:
    """(bits, task) -> its run, trained once for the tests of this module."""
    runs: dict[tuple[str, str], QloraRun] = {}

    def get(bits: str, task: str) -> QloraRun:
        if (bits, task) not in runs:
            out = tmp_path_factory.mktemp(f"qlora{bits}-{task}") / "run"
            runs[bits, task] = train_qlora(tiny_model_dir("llama"), out, bits, task)
        return runs[bits, task]

    return get


RUNS = [("4", "classification"), ("4", "generation"), ("8", "classification"), ("8", "generation")]
RUN_IDS = [f"{bits}bit-{task}" for bits, task in RUNS]


# -- training -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "task"), RUNS, ids=RUN_IDS)
def test_qlora_trains_the_adapter_over_quantized_base_layers(bits: str, task: str, qlora_run) -> None:
    from transformers import AutoTokenizer

    run = qlora_run(bits, task)
    assert AutoTokenizer.from_pretrained(run.source).pad_token is None  # a decoder without a pad token
    assert run.base_layers == [BITS[bits][1]] * BASE_LINEAR_LAYERS, run.base_layers

    lora_b = [name for name in run.initial if "lora_B" in name]
    assert len(lora_b) == BASE_LINEAR_LAYERS
    assert all(not run.initial[name].any() and run.final[name].any() for name in lora_b)  # B starts at zero
    assert all(not torch.equal(run.initial[name], run.final[name]) for name in run.initial if "lora_A" in name)

    losses = list(step_losses(run.out).values())
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(run.metrics["eval"]["validation"]["loss"])
    saved = load_file(str(run.out / adapters.ADAPTER_WEIGHTS))
    assert any("lora_A" in k for k in saved) and not (run.out / "model.safetensors").exists()
    assert all(t.is_floating_point() for t in saved.values())  # the adapter holds no quantized base weights


def test_evaluating_between_epochs_leaves_4bit_training_unchanged(tiny_model_dir, tmp_path: Path) -> None:
    """An evaluation must not change the base layers that training continues with.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 inference kernel at the first
    forward without gradients and keeps them packed: the repacking fails outright for layers narrower than its
    block (this tiny model's), and training continued on packed weights takes another kernel, whose backward
    gives other gradients. finetune keeps the training layout, so both runs take the same steps. (LoRA dropout
    off: an evaluation moves the random number stream, so the dropout masks after it differ, with or
    without quantization.)
    """
    epochs = ["--num_train_epochs", "2", "--save_strategy", "no", "--load_best_model_at_end", "false",
              "--logging_steps", "1", "--lora_dropout", "0"]
    source = tiny_model_dir("llama")
    quiet = train_qlora(source, tmp_path / "quiet", "4", "classification", *epochs, "--eval_strategy", "no")
    checked = train_qlora(source, tmp_path / "checked", "4", "classification", *epochs, "--eval_strategy", "epoch")
    assert len(step_losses(checked.out)) == 12
    assert step_losses(checked.out) == step_losses(quiet.out)
    for name, weight in quiet.final.items():
        torch.testing.assert_close(checked.final[name], weight, rtol=0, atol=0, msg=name)


# -- exact reload ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "task"), RUNS, ids=RUN_IDS)
def test_qlora_adapter_reloads_with_exactly_the_run_metrics(bits: str, task: str, qlora_run, monkeypatch) -> None:
    run = qlora_run(bits, task)
    loaded: list[Any] = []
    real = pipeline.load_for_inference

    def watched(config: Any):
        task_, trainer, raw, tokenized = real(config)
        loaded.append(trainer.model)
        return task_, trainer, raw, tokenized

    monkeypatch.setattr(pipeline, "load_for_inference", watched)
    assert main(["evaluate", str(run.out), *TASKS[task][2]]) == 0
    assert lora_base_layers(loaded[0]) == [BITS[bits][1]] * BASE_LINEAR_LAYERS  # quantized as in training

    trained, reloaded = run.metrics["eval"]["validation"], read_json(run.out / "eval_results.json")["validation"]
    names = ("accuracy", "f1", "loss", "examples") if task == "classification" else ("rouge1", "rougeL", "loss")
    for name in names:
        assert reloaded[name] == trained[name], name
    predictions = "predictions_validation.jsonl" if task == "classification" else "generated_predictions.jsonl"
    assert read_jsonl(run.out / predictions) == run.predictions


def test_qlora_over_a_bf16_checkpoint_reloads_exactly_and_merges_in_one_dtype(tiny_model_dir, tmp_path: Path) -> None:
    """peft's preparation computes a bf16 checkpoint's unquantized weights (norms, embeddings, head) in fp32.

    The reloaded base gets the same preparation (else its evaluation computes them in bf16 and the metrics move
    in the third digit), and the merged model is fp32 throughout, as the adapter model computed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, bf16 = tiny_model_dir("llama"), tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(source).save_pretrained(bf16)
    run = train_qlora(bf16, tmp_path / "run", "4", "classification")
    assert main(["evaluate", str(run.out), *TASKS["classification"][2]]) == 0
    trained, reloaded = run.metrics["eval"]["validation"], read_json(run.out / "eval_results.json")["validation"]
    for name in ("loss", "accuracy", "f1"):
        assert reloaded[name] == trained[name], name

    merged = tmp_path / "merged"
    assert main(["merge", str(run.out), "--output_dir", str(merged)]) == 0
    assert {t.dtype for t in load_file(str(merged / "model.safetensors")).values()} == {torch.float32}
    assert main(["evaluate", str(merged), *TASKS["classification"][2]]) == 0
    assert read_json(merged / "eval_results.json")["validation"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)


# -- merging ----------------------------------------------------------------------------------------------------------


def classifier_logits(model: Any, vocab_size: int, training: bool = False) -> torch.Tensor:
    """Logits of a fixed batch; ``training``: the forward training takes (8-bit: dequantized weights), dropout off."""
    model.train(training)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (6, 16), generator=generator)  # no pad token: each row's last token pools
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize("bits", ["4", "8"])
def test_merge_folds_the_adapter_into_the_dequantized_base(bits: str, qlora_run, tmp_path: Path) -> None:
    """The merged model is a plain full-precision model that computes what the adapter model computes.

    The adapter was trained over the quantized weights, so it is merged into their dequantized values, not
    into the original full-precision checkpoint (whose weights the adapter never saw). Against the forward
    the adapter trained with (both widths: the dequantized weights in fp32) the gap is float rounding, far
    below what the original weights as base would change; in evaluation an 8-bit layer multiplies in int8
    (bitsandbytes' LLM.int8, its inputs rounded to fp16 and 8 bits), which moves the logits by a fraction of
    a percent.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune import modeling
    from finetune.config import ModelConfig

    run, merged = qlora_run(bits, "classification"), tmp_path / "merged"
    assert main(["merge", str(run.out), "--output_dir", str(merged)]) == 0
    weights = load_file(str(merged / "model.safetensors"))
    assert not any(part in k for k in weights for part in ("lora", "base_layer", "modules_to_save", "absmax", "SCB"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert "quantization_config" not in read_json(merged / "config.json")
    assert not (merged / adapters.ADAPTER_CONFIG).exists()

    classifier = AutoModelForSequenceClassification
    adapter_model = modeling.load_model(classifier, ModelConfig(model_name_or_path=str(run.out)))
    full = classifier.from_pretrained(merged)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in full.modules())
    original = PeftModel.from_pretrained(classifier.from_pretrained(run.source, num_labels=2), str(run.out))
    vocab = full.config.vocab_size
    merged_logits = classifier_logits(full, vocab)
    as_trained = classifier_logits(adapter_model, vocab, training=True)
    trained_gap = (merged_logits - as_trained).abs().max().item()
    quantization_gap = (classifier_logits(original, vocab) - as_trained).abs().max().item()
    assert trained_gap < 1e-5 and trained_gap < 0.01 * quantization_gap, (trained_gap, quantization_gap)
    evaluated = classifier_logits(adapter_model, vocab)
    tolerance = {"4": 1e-5, "8": 0.01 * evaluated.abs().max().item()}[bits]
    assert (merged_logits - evaluated).abs().max().item() < tolerance

    batches = TASKS["classification"][2]
    assert main(["evaluate", str(merged), *batches]) == 0
    full_metrics = read_json(merged / "eval_results.json")["validation"]
    trained = run.metrics["eval"]["validation"]
    assert full_metrics["loss"] == pytest.approx(trained["loss"], rel={"4": 1e-5, "8": 1e-2}[bits])
    labels = [row["prediction"] for row in read_jsonl(merged / "predictions_validation.jsonl")]
    agree = sum(a == b["prediction"] for a, b in zip(labels, run.predictions, strict=True))
    assert agree == len(labels) if bits == "4" else agree >= 0.9 * len(labels)


def test_merge_adapter_flag_saves_the_merged_4bit_decoder(tiny_model_dir, tmp_path: Path) -> None:
    run = train_qlora(tiny_model_dir("llama"), tmp_path / "run", "4", "generation", "--merge_adapter", "true")
    assert (run.out / "model.safetensors").is_file() and not (run.out / adapters.ADAPTER_WEIGHTS).exists()
    assert "quantization_config" not in read_json(run.out / "config.json")
    assert main(["evaluate", str(run.out), *TASKS["generation"][2]]) == 0
    assert read_jsonl(run.out / "generated_predictions.jsonl") == run.predictions
    reloaded = read_json(run.out / "eval_results.json")["validation"]
    assert reloaded["rouge1"] == run.metrics["eval"]["validation"]["rouge1"]
    assert reloaded["loss"] == pytest.approx(run.metrics["eval"]["validation"]["loss"], rel=1e-5)


# -- settings ---------------------------------------------------------------------------------------------------------


def bitsandbytes_version(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    """What the installed-package lookup reports for bitsandbytes (None: not installed)."""
    real = metadata.version

    def lookup(name: str) -> str:
        if name != "bitsandbytes":
            return real(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", lookup)


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_qlora_without_bitsandbytes_is_a_one_line_error(flag: str, tmp_path: Path, monkeypatch, capsys) -> None:
    bitsandbytes_version(monkeypatch, None)
    assert main(["train", "glue-mrpc", "--output_dir", str(tmp_path / "run"), "--use_peft", "true", flag, "true"]) == 2
    error = one_error(capsys)
    assert f"{flag[2:]} (QLoRA) needs bitsandbytes" in error and "not installed" in error
    assert "pip install 'finetune[qlora]'" in error
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="an older bitsandbytes is fine with a CUDA GPU")
def test_qlora_with_a_bitsandbytes_without_cpu_backend_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    bitsandbytes_version(monkeypatch, "0.45.5")
    argv = ["train", "glue-mrpc", "--output_dir", str(tmp_path / "run"), "--use_peft", "true", "--load_in_4bit", "true"]
    assert main(argv) == 2
    error = one_error(capsys)
    assert "no CUDA GPU" in error and "bitsandbytes 0.45.5" in error and ">= 0.49" in error
    assert "pip install 'finetune[qlora]'" in error


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_qlora_settings_pass_with_bitsandbytes_installed(flag: str, capsys) -> None:
    assert main(["train", "glue-mrpc", "--use_peft", "true", flag, "true", "--print_config"]) == 0
    assert f"{flag[2:]}: true" in capsys.readouterr().out


def test_qlora_flags_help_names_no_cuda_requirement() -> None:
    from finetune.config import PeftSettings

    for name in ("load_in_4bit", "load_in_8bit"):
        text = PeftSettings.__dataclass_fields__[name].metadata["help"]
        assert "CUDA only" not in text and "CPU" in text, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU placement and compute dtype")
@pytest.mark.parametrize(("flags", "dtype"), [("", torch.float32), ("avx512f avx512_bf16", torch.bfloat16)])
def test_4bit_computes_on_the_cpu_in_bf16_only_where_it_is_native(flags: str, dtype, monkeypatch) -> None:
    from finetune.config import PeftSettings
    from finetune.precision import FLAGS_ENV

    monkeypatch.setenv(FLAGS_ENV, flags)
    kwargs = adapters.quantization_kwargs(PeftSettings(use_peft=True, load_in_4bit=True))
    assert kwargs["device_map"] == {"": "cpu"}
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == dtype
    assert adapters.quantization_kwargs(PeftSettings(use_peft=True, load_in_8bit=True))["device_map"] == {"": "cpu"}
