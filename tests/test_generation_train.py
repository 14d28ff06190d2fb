"""`finetune train / evaluate / predict` for summarization and translation with tiny random-weight models.

Every model kind goes through the real path: encoder-decoder (T5, BART, Marian, mBART), decoder-only
(GPT-2, Llama) and bert2bert (an EncoderDecoderModel warm-started from a tiny BERT), on the XSum and
WMT16 en-ro samples in ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SAMPLES, read_json, read_jsonl
from safetensors.torch import load_file

from finetune.cli import main

XSUM = SAMPLES / "xsum_sample" / "sample.jsonl"  # 10 articles: 7 train, 3 validation
WMT = SAMPLES / "wmt16_en_ro_sample"  # 11 train, 16 validation, 20 test pairs
COMMON = [
    "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--learning_rate", "3e-3", "--warmup_steps", "0", "--logging_steps", "1", "--max_new_tokens", "6",
    "--max_seq_length", "96", "--max_target_length", "24", "--report_to", "none", "--disable_tqdm", "true",
]
SUMMARY_METRICS = {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}


def model_dir(arch: str, tiny_model_dir) -> Path:
    return tiny_model_dir("bert" if arch == "bert2bert" else arch)


def train_summarization(source: Path, out: Path, *extra: str) -> int:
    return main([
        "train", "--task", "summarization", "--model_name_or_path", str(source), "--output_dir", str(out),
        "--train_file", str(XSUM), "--validation_split_percentage", "30", *COMMON, *extra,
    ])


def train_translation(source: Path, out: Path, *extra: str) -> int:
    return main([
        "train", "--task", "translation", "--model_name_or_path", str(source), "--output_dir", str(out),
        "--train_file", str(WMT / "train.jsonl"), "--validation_file", str(WMT / "val.jsonl"),
        "--test_file", str(WMT / "test.jsonl"), "--source_lang", "en", "--target_lang", "ro",
        "--max_eval_samples", "4", *COMMON, *extra,
    ])


def weights_changed(before: Path, after: Path) -> float:
    """Share of the tensors present in both checkpoints (same name and shape) that training changed."""
    old, new = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    shared = [k for k in new if k in old and old[k].shape == new[k].shape]
    if not shared:  # bert2bert: the saved names gain an encoder./decoder. prefix
        old = {f"encoder.{k.split('.', 1)[1]}": v for k, v in old.items() if k.startswith("bert.")}
        shared = [k for k in new if k in old and old[k].shape == new[k].shape]
    assert len(shared) > 5
    return sum(not torch.equal(old[k], new[k]) for k in shared) / len(shared)


@pytest.mark.parametrize("arch", ["t5", "bart", "gpt2", "bert2bert"])
def test_summarization_trains_generates_and_scores(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    source, out = model_dir(arch, tiny_model_dir), tmp_path / "run"
    extra = ["--source_prefix", "summarize: "] if arch == "t5" else []
    assert train_summarization(source, out, "--num_beams", "2", "--no_repeat_ngram_size", "3", *extra) == 0

    metrics = read_json(out / "metrics.json")
    validation = metrics["eval"]["validation"]
    assert validation["examples"] == 3
    assert SUMMARY_METRICS <= set(validation)
    assert all(0.0 <= validation[name] <= 100.0 for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert 0 < validation["gen_len"] <= 6
    # The lead-1 baseline is the same for every model: scored by the same code on the same 3 articles.
    assert validation["lead_1_rouge1"] > 5.0
    assert metrics["train"]["train_loss"] > 0
    assert weights_changed(source, out) > 0.5

    generation = read_json(out / "generation_config.json")
    assert generation["max_new_tokens"] == 6 and generation["num_beams"] == 2
    assert generation["no_repeat_ngram_size"] == 3
    records = read_jsonl(out / "generated_predictions.jsonl")
    assert len(records) == 3
    assert all(set(r) == {"index", "source", "references", "prediction", "baseline"} for r in records)
    assert all(isinstance(r["prediction"], str) and len(r["references"]) == 1 for r in records)
    articles = {row["document"]: row["summary"] for row in read_jsonl(XSUM)}
    assert all(articles.get(r["source"]) == r["references"][0] for r in records)

    if arch == "bert2bert":
        config = read_json(out / "config.json")
        assert config["model_type"] == "encoder-decoder"
        # MiniLM's WordPiece ids: [PAD] 0, [CLS] 101 starts the decoder, [SEP] 102 ends the output
        assert (config["decoder_start_token_id"], config["pad_token_id"], config["eos_token_id"]) == (101, 0, 102)
        assert (generation["decoder_start_token_id"], generation["eos_token_id"]) == (101, 102)


@pytest.mark.parametrize("arch", ["marian", "mbart", "llama"])
def test_translation_trains_and_predicts(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    source, out = tiny_model_dir(arch), tmp_path / "run"
    extra = ["--forced_bos_token", "<s>"] if arch == "mbart" else []
    assert train_translation(source, out, *extra) == 0

    validation = read_json(out / "metrics.json")["eval"]["validation"]
    assert validation["examples"] == 16  # the whole split at the end; --max_eval_samples only during training
    assert 0.0 <= validation["sacrebleu"] <= 100.0 and 0.0 <= validation["chrf"] <= 100.0
    assert validation["sacrebleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    # Copying English into the Romanian output still shares names and numbers with the references.
    assert 0.0 < validation["copy_source_sacrebleu"] < 30.0 and validation["copy_source_chrf"] > 10.0
    during_training = [e for e in read_json(out / "trainer_state.json")["log_history"] if "eval_sacrebleu" in e]
    assert len(during_training) == 2
    if arch == "mbart":
        assert read_json(out / "generation_config.json")["forced_bos_token_id"] == 1  # "<s>"

    records = read_jsonl(out / "generated_predictions.jsonl")
    assert len(records) == 16
    first = read_jsonl(WMT / "val.jsonl")[0]["translation"]
    assert records[0]["source"] == first["en"] and records[0]["references"] == [first["ro"]]

    assert main(["predict", str(out), "--split", "test", "--max_predict_samples", "5"]) == 0
    test_records = read_jsonl(out / "generated_predictions_test.jsonl")
    assert len(test_records) == 5
    assert test_records[0]["source"] == read_jsonl(WMT / "test.jsonl")[0]["translation"]["en"]


def test_evaluate_a_run_directory_on_the_full_split(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_translation(tiny_model_dir("gpt2"), out, "--num_train_epochs", "1") == 0
    trained = read_json(out / "metrics.json")["eval"]["validation"]
    assert main(["evaluate", str(out)]) == 0
    evaluated = read_json(out / "eval_results.json")["validation"]
    # The run's generation settings are reused and greedy decoding is deterministic: the same outputs.
    assert evaluated["sacrebleu"] == pytest.approx(trained["sacrebleu"])
    assert evaluated["gen_len"] == pytest.approx(trained["gen_len"]) and 0 < evaluated["gen_len"] <= 6
    assert evaluated["examples"] == 16


def test_decoder_only_prompt_masks_and_left_pads(tiny_model_dir) -> None:
    """Labels cover target + EOS only; generation sees the prompt alone, left-padded."""
    from datasets import Dataset
    from finetune.tasks import task_class

    from finetune.config import parse_run_config
    from finetune.generation import IGNORE_INDEX, left_padded_prompts

    config = parse_run_config(None, [
        "--task", "summarization", "--model_name_or_path", str(tiny_model_dir("gpt2")),
        "--max_seq_length", "40", "--max_target_length", "5",
    ])
    task = task_class("summarization")(config)
    tokenizer = task.load_tokenizer()
    raw = Dataset.from_dict({"document": ["word " * 200, "short text"], "summary": ["a b c d e f g h", "x"]})
    encoded = task.tokenize({"validation": raw}, tokenizer)["validation"]
    long, short = encoded[0], encoded[1]
    assert len(long["input_ids"]) - 6 <= 40  # prompt truncated to max_seq_length, target to 5 + EOS
    targets = [[t for t in row["labels"] if t != IGNORE_INDEX] for row in (long, short)]
    assert targets[0][-1] == tokenizer.eos_token_id and len(targets[0]) == 6
    assert tokenizer.decode(targets[1][:-1]).strip() == "x"
    head_len = len(long["input_ids"]) - len(targets[0])
    assert long["labels"][:head_len] == [IGNORE_INDEX] * head_len
    assert tokenizer.decode(long["input_ids"][:head_len]).rstrip().endswith("Summary:")

    pad = tokenizer.pad_token_id
    batch = tokenizer.pad([{"input_ids": r["input_ids"]} for r in (long, short)], return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for i, row in enumerate((long, short)):
        labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
    ids, mask = left_padded_prompts(batch["input_ids"], batch["attention_mask"], labels, pad)
    short_prompt = len(short["input_ids"]) - len(targets[1])
    assert ids.shape[1] == head_len
    assert mask[1].tolist() == [0] * (head_len - short_prompt) + [1] * short_prompt
    assert ids[1, -short_prompt:].tolist() == short["input_ids"][:short_prompt]


def test_evaluation_batches_keep_the_rows_order(tiny_model_dir) -> None:
    """Predictions are put back against their rows: the trainer must not shuffle evaluation batches."""
    from torch.utils.data import SequentialSampler

    from finetune.config import parse_run_config
    from finetune.pipeline import load_for_inference

    config = parse_run_config(None, [
        "--task", "translation", "--model_name_or_path", str(tiny_model_dir("marian")),
        "--validation_file", str(WMT / "val.jsonl"), "--source_lang", "en", "--target_lang", "ro",
        "--train_sampling_strategy", "group_by_length", "--group_by_length_window", "2", "--report_to", "none",
    ])
    task, trainer, raw, tokenized = load_for_inference(config)
    assert trainer.args.predict_with_generate and trainer.args.group_by_length_window == 2
    assert isinstance(trainer._get_eval_sampler(tokenized["validation"]), SequentialSampler)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_free_batches_give_the_padded_loss(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """Flattened training batches hold no padding, and each example still attends only to itself."""
    from finetune.config import parse_run_config
    from finetune.pipeline import build_task, tokenized_splits

    config = parse_run_config(None, [
        "--task", "summarization", "--model_name_or_path", str(tiny_model_dir(arch)), "--train_file", str(XSUM),
        "--output_dir", str(tmp_path / "run"), "--padding_free", "true", "--per_device_train_batch_size", "4",
        "--max_seq_length", "64", "--max_target_length", "16", "--report_to", "none",
        "--eval_strategy", "no", "--save_strategy", "no",
    ])
    task = build_task(config)
    raw, tokenized, tokenizer = tokenized_splits(task, config)
    model = task.load_model(tokenizer)
    trainer = task.build_trainer(model, tokenizer, tokenized["train"], None, [])
    assert trainer.padding_free

    flat = next(iter(trainer.get_train_dataloader()))
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    examples = [tokenized["train"][i] for i in range(4)]
    assert flat["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)
    assert (flat["position_ids"][0] == 0).sum() == 4  # positions restart at every example

    # The same four examples, padded as evaluation pads them, must give the same loss and the same logits.
    padded = trainer.data_collator(examples)
    flattened = trainer.get_train_dataloader().collate_fn(examples)
    assert padded["input_ids"].shape[1] < flattened["input_ids"].shape[1]
    model.train()  # training mode (the mode padding-free applies to), without dropout's randomness
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(flattened)).item() == pytest.approx(
            trainer.compute_loss(model, dict(padded)).item(), rel=1e-5
        )
        padded_logits = model(**padded).logits
        packed_logits = model(**flattened).logits[0]
        # with a KV cache transformers stops keeping packed examples apart: the check below can tell
        leaky_logits = model(**flattened, use_cache=True).logits[0]
    starts = [0, *torch.cumsum(torch.tensor([len(e["input_ids"]) for e in examples]), 0).tolist()]
    for i in range(4):
        n = starts[i + 1] - starts[i]
        torch.testing.assert_close(packed_logits[starts[i]:starts[i + 1]], padded_logits[i, :n], atol=1e-5, rtol=1e-4)
    assert (leaky_logits[starts[1]:] - packed_logits[starts[1]:]).abs().max() > 1e-3


def test_padding_free_is_refused_for_classification(tiny_model_dir, tmp_path: Path, capsys) -> None:
    code = main([
        "train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("gpt2")), "--output_dir",
        str(tmp_path / "run"), "--max_train_samples", "8", "--max_eval_samples", "8", "--padding_free", "true",
    ])
    assert code == 2
    assert "padding_free" in capsys.readouterr().err
