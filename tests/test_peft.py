"""LoRA through peft: settings, the saved adapter, exact reload, merging, every task family.

Tiny random-weight models (tests/conftest.py). The reload tests are the ones that catch the ecosystem's
known pitfall: a LoRA classifier whose head (or another freshly initialised module, such as BERT's pooler)
is not saved with the adapter comes back with new random weights and scores differently.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, read_json, read_jsonl
from safetensors.torch import load_file
from test_publish import hub  # noqa: F401  (fixture: HfApi stubbed, a fake token)

from finetune.cli import main

SMALL = [
    "--max_train_samples", "48", "--max_eval_samples", "40", "--num_train_epochs", "1",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--learning_rate", "5e-3", "--logging_steps", "2", "--disable_tqdm", "true",
]
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]


def train(model: Path, out: Path, recipe: str = "glue-mrpc", *extra: str) -> int:
    return main(["train", recipe, "--model_name_or_path", str(model), "--output_dir", str(out), *SMALL, *extra])


def one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# -- settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_peft", "true", "--lora_r", "0"], "--lora_r 0: must be an integer >= 1"),
        (["--use_peft", "true", "--r", "-4"], "--lora_r -4: must be an integer >= 1"),
        (["--use_peft", "true", "--lora_dropout", "1.5"], "--lora_dropout 1.5: must be a number >= 0 and < 1"),
        (["--lora_r", "8"], "lora_r is a LoRA setting, but use_peft is false"),
        (["--use_peft", "true", "--load_in_4bit", "true", "--load_in_8bit", "true"], "exclude each other"),
    ],
)
def test_wrong_lora_settings_are_one_line_errors(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["train", "glue-mrpc", "--output_dir", str(tmp_path / "run"), *flags]) == 2
    assert message in one_error(capsys)
    assert not (tmp_path / "run").exists()


def test_unknown_target_module_is_a_one_line_error_before_training(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(tiny_model_dir("llama"), out, "glue-mrpc", *LORA, "--lora_target_modules", "q_proj", "qkv") == 2
    error = one_error(capsys)
    assert "lora_target_modules: the model (LlamaForSequenceClassification) has no module named 'qkv'" in error
    assert "q_proj" in error  # the names it does have
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))


def test_peft_recipe_section_and_peft_flag_names(tmp_path: Path) -> None:
    from finetune.config import parse_run_config

    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        "model:\n  model_name_or_path: x\ndata:\n  task_name: mrpc\n"
        "peft:\n  use_peft: true\n  r: 8\n  target_modules: [q_proj, v_proj]\n  use_dora: true\n"
    )
    config = parse_run_config(str(recipe), ["--lora_alpha", "4", "--modules_to_save", "pooler"])
    assert (config.peft.lora_r, config.peft.lora_alpha, config.peft.use_dora) == (8, 4, True)
    assert config.peft.lora_target_modules == ["q_proj", "v_proj"]
    assert config.peft.lora_modules_to_save == ["pooler"]
    assert config.to_dict()["peft"]["lora_r"] == 8
    assert parse_run_config("glue-mrpc", ["--use_peft", "true"]).peft.lora_target_modules == ["all-linear"]


# -- classification: the head is trained, saved, and comes back -----------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_lora_classifier_reloads_with_exactly_the_run_metrics(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir(arch)
    out = tmp_path / "run"
    assert train(source, out, "glue-mrpc", *LORA) == 0

    # The run holds the adapter, not a full model.
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert any((out / n).is_file() for n in ("tokenizer.json", "vocab.txt"))
    adapter_config = read_json(out / "adapter_config.json")
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(source)
    saved = load_file(str(out / "adapter_model.safetensors"))
    head = "classifier" if arch == "bert" else "score"
    assert any(k.startswith(f"base_model.model.{head}.") for k in saved), sorted(saved)[:5]
    assert any("lora_A" in k for k in saved) and any("lora_B" in k for k in saved)
    if arch == "bert":  # the tiny checkpoint has no pooler: it is new, so it is trained and saved in full
        assert any(".pooler.dense." in k and "lora" not in k for k in saved), sorted(saved)
        assert not any(".pooler.dense.lora" in k for k in saved)

    metrics = read_json(out / "metrics.json")
    counts = metrics["parameters"]
    assert 0 < counts["trainable"] < counts["total"] / 2
    trained = metrics["eval"]["validation"]
    assert trained["examples"] == 40

    # Same examples in the same batches as the evaluation at the end of training.
    assert main(["evaluate", str(out), "--max_eval_samples", "40", "--per_device_eval_batch_size", "16"]) == 0
    reloaded = read_json(out / "eval_results.json")["validation"]
    for name in ("accuracy", "f1", "loss", "examples"):
        assert reloaded[name] == trained[name], name
    predictions = read_jsonl(out / "predictions_validation.jsonl")
    assert len(predictions) == 40 and {p["prediction"] for p in predictions} <= {"not_equivalent", "equivalent"}


def test_lora_trains_only_the_adapter_and_head(tiny_model_dir, tmp_path: Path) -> None:
    """The frozen base stays as loaded; the LoRA matrices and the head move."""
    from transformers import AutoModelForSequenceClassification

    from finetune import modeling
    from finetune.config import ModelConfig

    source = tiny_model_dir("llama")
    out = tmp_path / "run"
    assert train(source, out, "glue-sst2", *LORA) == 0
    model = modeling.load_model(AutoModelForSequenceClassification, ModelConfig(model_name_or_path=str(out)))
    base = load_file(str(source / "model.safetensors"))
    loaded = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    frozen = [k for k in base if k.startswith("model.layers.") and k.endswith("q_proj.weight")]
    assert frozen
    for key in frozen:
        torch.testing.assert_close(loaded[key], base[key], rtol=0, atol=0)
    lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero; training moved it


# -- text-to-text: encoder-decoder, decoder-only, bert2bert ---------------------------------------------------

XSUM = SAMPLES / "xsum_sample" / "sample.jsonl"  # 10 articles: 7 train, 3 validation
GENERATION = [
    "--task", "summarization", "--train_file", str(XSUM), "--validation_split_percentage", "30",
    "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1", "--max_new_tokens", "6",
    "--max_seq_length", "96", "--max_target_length", "24", "--disable_tqdm", "true",
]


@pytest.mark.parametrize("arch", ["t5", "llama", "bert2bert"])
def test_lora_summarization_reloads_with_the_same_generations(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    source, out = tiny_model_dir("bert" if arch == "bert2bert" else arch), tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(source), "--output_dir", str(out), *GENERATION, *LORA]
    assert main(argv) == 0

    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert read_json(out / "generation_config.json")["max_new_tokens"] == 6
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in saved)
    if arch == "bert2bert":  # cross-attention is new in a warm-started decoder: trained and saved in full
        assert any(".crossattention." in k and "lora" not in k for k in saved), sorted(saved)[:8]
    assert read_json(out / "adapter_config.json")["task_type"] == "SEQ_2_SEQ_LM" if arch != "llama" else "CAUSAL_LM"
    trained = read_json(out / "metrics.json")["eval"]["validation"]
    generated = read_jsonl(out / "generated_predictions.jsonl")
    assert trained["examples"] == 3 and len(generated) == 3

    # The run's eval batch size: the loss of another batching differs in the last digits.
    assert main(["evaluate", str(out), "--per_device_eval_batch_size", "8"]) == 0
    reloaded = read_json(out / "eval_results.json")["validation"]
    assert read_jsonl(out / "generated_predictions.jsonl") == generated
    for name in ("rouge1", "rouge2", "rougeL", "gen_len", "loss"):
        assert reloaded[name] == trained[name], name


# -- merged models ----------------------------------------------------------------------------------------------


def test_merge_command_writes_a_full_model_run_that_predicts_the_same(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out, merged = tmp_path / "run", tmp_path / "run-merged"
    assert train(tiny_model_dir("bert"), out, "glue-mrpc", *LORA) == 0
    assert main(["merge", str(out)]) == 0
    assert f"merged model written to {merged}" in capsys.readouterr().out

    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    weights = load_file(str(merged / "model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k or "base_layer" in k for k in weights)
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= set(weights)
    assert read_json(merged / "config.json")["architectures"] == ["BertForSequenceClassification"]
    assert (merged / "finetune_config.yaml").is_file() and (merged / "metrics.json").is_file()

    batches = ["--max_eval_samples", "40", "--per_device_eval_batch_size", "16"]
    assert main(["evaluate", str(out), *batches]) == 0
    assert main(["evaluate", str(merged), *batches]) == 0
    adapter = read_json(out / "eval_results.json")["validation"]
    full = read_json(merged / "eval_results.json")["validation"]
    rows = {run: read_jsonl(run / "predictions_validation.jsonl") for run in (out, merged)}
    strip = [[{k: v for k, v in row.items() if k != "confidence"} for row in rows[run]] for run in (out, merged)]
    assert strip[0] == strip[1]  # the same predicted labels; the confidences differ in float rounding
    assert [r.get("confidence", 0) for r in rows[merged]] == pytest.approx([r.get("confidence", 0) for r in rows[out]])
    assert full["accuracy"] == adapter["accuracy"] and full["f1"] == adapter["f1"]
    assert full["loss"] == pytest.approx(adapter["loss"], rel=1e-5)  # merged weights round differently

    assert main(["merge", str(merged)]) == 2  # a full model has nothing to merge
    assert "holds no LoRA adapter" in one_error(capsys)


def test_merge_adapter_flag_saves_the_merged_decoder(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(tiny_model_dir("llama")), "--output_dir", str(out), *GENERATION,
            *LORA, "--merge_adapter", "true"]
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    trained = read_json(out / "metrics.json")["eval"]["validation"]
    generated = read_jsonl(out / "generated_predictions.jsonl")
    assert main(["evaluate", str(out), "--per_device_eval_batch_size", "8"]) == 0
    assert read_jsonl(out / "generated_predictions.jsonl") == generated
    assert read_json(out / "eval_results.json")["validation"]["rouge1"] == trained["rouge1"]


# -- the model card ---------------------------------------------------------------------------------------------


def test_card_of_an_adapter_and_of_its_merged_model(hub, tiny_model_dir, tmp_path: Path, capsys) -> None:  # noqa: F811
    from huggingface_hub.repocard import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    out = tmp_path / "run"
    argv = ["--push_to_hub", "true", "--hub_model_id", "me/tiny-lora", "--lora_target_modules", "q_proj,v_proj"]
    assert train(tiny_model_dir("llama"), out, "glue-mrpc", *LORA, *argv) == 0
    _, (_, operations), _ = hub.calls[-1]
    uploaded = {op.path_in_repo for op in operations}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "README.md"} <= uploaded
    assert "model.safetensors" not in uploaded

    metadata = metadata_load(out / "README.md")
    assert metadata["library_name"] == "peft" and {"peft", "lora"} <= set(metadata["tags"])
    _, results = model_index_to_eval_results(metadata["model-index"])
    assert {r.metric_type for r in results} == {"f1", "accuracy"}
    text = (out / "README.md").read_text()
    counts = read_json(out / "metrics.json")["parameters"]
    assert f"| trainable parameters | {counts['trainable']:,} of {counts['total']:,}" in text
    assert "| lora_r | 4 |" in text and "| lora_alpha | 8 |" in text
    assert "| lora_target_modules | q_proj, v_proj |" in text
    assert "| lora_modules_to_save | " in text and "score" in text.split("| lora_modules_to_save | ")[1].split("\n")[0]
    assert "--use_peft true --lora_r 4 --lora_alpha 8 --lora_target_modules q_proj,v_proj" in text  # reproduce

    merged = tmp_path / "merged"
    assert main(["merge", str(out), "--output_dir", str(merged)]) == 0
    capsys.readouterr()
    assert main(["push", str(merged), "--dry_run", "--hub_model_id", "me/tiny-lora-merged"]) == 0
    shown = capsys.readouterr().out
    assert "library_name: transformers" in shown and "merged into the base weights" in shown
    assert "model.safetensors" in shown and "adapter_model.safetensors" not in shown


# -- resume, several processes, GLUE runner, accumulation, bf16 ----------------------------------------------------

RESUME = [
    *LORA, "--max_train_samples", "48", "--max_eval_samples", "16", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "16", "--max_steps", "24", "--learning_rate", "3e-3", "--logging_steps", "1",
    "--eval_strategy", "steps", "--eval_steps", "12", "--save_strategy", "steps", "--save_steps", "12",
    "--seed", "11", "--disable_tqdm", "true",
]


def test_lora_run_stopped_by_sigterm_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from test_fault_tolerance import child_env, read_until_step, step_losses, train_argv

    from finetune.callbacks import last_complete_checkpoint
    from finetune.errors import PREEMPTED_EXIT_CODE

    model, whole, stopped = tiny_model_dir("llama"), tmp_path / "whole", tmp_path / "stopped"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the child process (OMP_NUM_THREADS=1)
    try:
        assert main(train_argv(model, whole, *RESUME)) == 0
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune", *train_argv(model, stopped, *RESUME)],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        seen: list[str] = []
        try:
            read_until_step(process, 3, seen)
            process.send_signal(signal.SIGTERM)
            rest, _ = process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == PREEMPTED_EXIT_CODE, ("".join(seen) + rest)[-3000:]
        checkpoint = Path(last_complete_checkpoint(stopped) or "")
        step = int(checkpoint.name.split("-")[1])
        assert 3 <= step < 12
        assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()

        assert main(train_argv(model, stopped, *RESUME, "--resume_from_checkpoint", "last")) == 0
    finally:
        torch.set_num_threads(threads)
    expected, resumed = step_losses(whole), step_losses(stopped)
    assert sorted(resumed) == list(range(1, 25))
    for later in range(step + 1, 25):
        assert resumed[later] == pytest.approx(expected[later], rel=1e-6, abs=1e-7), later
    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in (whole, stopped))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)
    final = [read_json(run / "metrics.json")["eval"]["validation"] for run in (whole, stopped)]
    assert final[0]["accuracy"] == final[1]["accuracy"] and final[0]["f1"] == final[1]["f1"]


@pytest.mark.distributed
def test_lora_on_two_processes_trains_once_and_saves_one_adapter(tiny_model_dir, tmp_path: Path) -> None:
    from test_distributed import EVAL_SAMPLES, TRAIN_ARGS, accelerate_launch

    run = tmp_path / "run"
    done = accelerate_launch(
        ["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(run),
         *TRAIN_ARGS, *LORA],
        tmp_path / "datasets-cache",
    )
    assert done.stdout.count("run saved to") == 1
    assert read_json(run / "trainer_state.json")["global_step"] == 4  # 64 examples / (8 x 2 processes)
    assert (run / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()
    during_training = read_json(run / "metrics.json")["eval"]["validation"]
    assert during_training["examples"] == EVAL_SAMPLES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process, the saved adapter: the same task metrics as the two processes at the end of training
        assert main(["evaluate", str(run), "--output_dir", str(tmp_path / "one"), "--per_device_eval_batch_size",
                     "8"]) == 0
    finally:
        torch.set_num_threads(threads)
    single = read_json(tmp_path / "one" / "eval_results.json")["validation"]
    for name in ("accuracy", "f1", "examples"):
        assert single[name] == during_training[name], name


def test_glue_runner_trains_lora_adapters_and_predicts_with_them(tiny_model_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "glue"
    short = ["--max_train_samples", "16", "--max_eval_samples", "16", "--max_predict_samples", "10",
             "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3"]
    argv = ["glue", "--model_name_or_path", str(tiny_model_dir("bert")), "--tasks", "rte,stsb", "--output_dir",
            str(out), *short, *LORA]
    assert main(argv) == 0
    tasks = read_json(out / "glue_results.json")["tasks"]
    assert {name: task["status"] for name, task in tasks.items()} == {"stsb": "done", "rte": "done"}
    for task in tasks.values():
        run = out / task["best_run"]
        assert (run / "adapter_model.safetensors").is_file() and not (run / "model.safetensors").exists()
    with zipfile.ZipFile(out / "glue_submission.zip") as archive:
        rows = {name: archive.read(name).decode().strip().splitlines() for name in archive.namelist()}
    assert set(rows) == {"RTE.tsv", "STS-B.tsv"} and all(len(lines) == 11 for lines in rows.values())
    capsys.readouterr()
    assert main(["push", str(out), "--dry_run", "--hub_model_id", "me/glue-lora"]) == 0
    shown = capsys.readouterr().out
    assert "library_name: peft" in shown and "rte/adapter_model.safetensors" in shown


def test_lora_with_gradient_accumulation_and_bf16(tiny_model_dir, tmp_path: Path) -> None:
    source = tiny_model_dir("llama")
    accumulated = tmp_path / "accumulated"
    assert train(source, accumulated, "glue-mrpc", *LORA, "--gradient_accumulation_steps", "2") == 0
    assert read_json(accumulated / "trainer_state.json")["global_step"] == 3  # 48 / (8 x 2)
    trained = read_json(accumulated / "metrics.json")["eval"]["validation"]
    assert main(["evaluate", str(accumulated), "--max_eval_samples", "40", "--per_device_eval_batch_size", "16"]) == 0
    reloaded = read_json(accumulated / "eval_results.json")["validation"]
    assert (reloaded["accuracy"], reloaded["loss"]) == (trained["accuracy"], trained["loss"])

    mixed = tmp_path / "bf16"
    cpu = ["--use_cpu", "true"] if not torch.cuda.is_available() else []  # transformers' bf16-on-CPU switch
    assert train(source, mixed, "glue-mrpc", *LORA, "--bf16", "true", *cpu) == 0
    losses = [e["loss"] for e in read_json(mixed / "trainer_state.json")["log_history"] if "loss" in e]
    assert losses and all(math.isfinite(loss) for loss in losses)
    saved = load_file(str(mixed / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # autocast computes in bf16; weights stay fp32
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)


def test_adapters_reads_the_file_the_run_config_is_saved_to() -> None:
    from finetune import adapters
    from finetune.config import RESOLVED_CONFIG_NAME

    assert adapters.RUN_CONFIG_NAME == RESOLVED_CONFIG_NAME  # a copy: adapters cannot import config (circle)


@pytest.mark.parametrize("variant", ["--use_dora", "--use_rslora"])
def test_dora_and_rslora_train_save_and_reload(variant: str, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(tiny_model_dir("llama"), out, "glue-mrpc", *LORA, variant, "true") == 0
    assert read_json(out / "adapter_config.json")[variant[2:]] is True
    if variant == "--use_dora":  # DoRA's magnitude vectors are saved with the adapter
        assert any("lora_magnitude_vector" in k for k in load_file(str(out / "adapter_model.safetensors")))
    trained = read_json(out / "metrics.json")["eval"]["validation"]
    assert main(["evaluate", str(out), "--max_eval_samples", "40", "--per_device_eval_batch_size", "16"]) == 0
    reloaded = read_json(out / "eval_results.json")["validation"]
    assert (reloaded["accuracy"], reloaded["loss"]) == (trained["accuracy"], trained["loss"])
