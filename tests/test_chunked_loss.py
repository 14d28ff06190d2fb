"""The decoder loss from hidden states in chunks (issue 24.2): the plain loss and its gradients, without full logits.

Compared with what transformers computes from the full logits: the model's own ForCausalLMLoss (labels passed
to the forward), transformers' LabelSmoother for label smoothing, and DataCollatorWithFlattening's
padding-free rows; on a tiny Llama and on GPT-2, with chunks small enough that every batch spans several.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_precision import family_argv
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening
from transformers.trainer_pt_utils import LabelSmoother

from finetune import pipeline
from finetune.config import parse_run_config
from finetune.generation import chunked_loss
from finetune.generation.chunked_loss import HiddenStateLoss

IGNORE = -100


def prompt_target_batch(vocab: int, rows: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    """Right-padded rows whose first tokens (the prompt) and padding carry no label, as the tasks encode them."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, pad) in enumerate([(4, 0), (6, 3), (2, 5)][:rows]):
        labels[row, :prompt] = IGNORE
        if pad:
            mask[row, -pad:] = 0
            labels[row, -pad:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, loss) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def chunked(model, batch, smoothing: float, items, monkeypatch) -> tuple[float, dict[str, torch.Tensor]]:
    monkeypatch.setattr(chunked_loss, "CHUNK_TOKENS", 5)  # several chunks per batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss_fn = HiddenStateLoss(model, smoothing)
    with loss_fn.training():
        outputs = model(**inputs)
        assert outputs.logits.numel() == 0  # no logits were computed in the forward
        loss = loss_fn(outputs, batch["labels"], num_items_in_batch=items)
    return loss_and_grads(model, loss)


def assert_same(expected, actual) -> None:
    assert actual[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert actual[1].keys() == expected[1].keys() and actual[1]
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def decoder(tiny_model_dir):
    def load(arch: str):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
        return model.train()  # dropout on: the two passes must draw the same masks

    return load


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("items", [None, 17])  # mean over this batch's tokens, or the Trainer's step count
def test_same_loss_and_gradients_as_the_full_logits(arch: str, items, decoder, monkeypatch) -> None:
    model = decoder(arch)
    batch = prompt_target_batch(model.config.vocab_size)
    torch.manual_seed(1)
    plain = loss_and_grads(model, model(**batch, num_items_in_batch=items).loss)
    torch.manual_seed(1)
    assert_same(plain, chunked(model, batch, 0.0, items, monkeypatch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_label_smoothing_matches_transformers_label_smoother(arch: str, decoder, monkeypatch) -> None:
    model = decoder(arch)
    batch = prompt_target_batch(model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.manual_seed(1)
    smoothed = LabelSmoother(epsilon=0.1)(model(**inputs), batch["labels"], shift_labels=True, num_items_in_batch=9)
    plain = loss_and_grads(model, smoothed)
    torch.manual_seed(1)
    assert_same(plain, chunked(model, batch, 0.1, 9, monkeypatch))


def test_padding_free_rows_stay_apart(decoder, monkeypatch) -> None:
    model = decoder("llama")
    rows = prompt_target_batch(model.config.vocab_size)
    examples = [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                for ids, m, lab in zip(rows["input_ids"], rows["attention_mask"], rows["labels"], strict=True)]
    batch = DataCollatorWithFlattening()(examples)  # one row, position_ids restart per example
    assert batch["input_ids"].shape[0] == 1
    torch.manual_seed(1)
    plain = loss_and_grads(model, model(**batch, num_items_in_batch=11).loss)
    torch.manual_seed(1)
    assert_same(plain, chunked(model, batch, 0.0, 11, monkeypatch))


def test_a_head_that_rescales_its_logits_keeps_the_full_loss(decoder) -> None:
    model = decoder("llama")
    assert chunked_loss.unsupported_reason(model) is None
    model.config.final_logit_softcapping = 30.0  # Gemma-2's soft-capping happens after the head
    assert "final_logit_softcapping" in chunked_loss.unsupported_reason(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_with_the_chunked_loss_ends_at_the_plain_runs_weights(arch: str, tiny_model_dir, tmp_path: Path):
    """The real training path, gradient accumulation 2 and label smoothing: same weights as --chunked_loss false."""
    settings = ["--max_steps", "3", "--learning_rate", "5e-3", "--gradient_accumulation_steps", "2",
                "--per_device_train_batch_size", "2", "--label_smoothing_factor", "0.1"]
    weights, losses = [], []
    for on in ("true", "false"):
        argv = [*family_argv("summarization", tiny_model_dir(arch), tmp_path / on), *settings, "--chunked_loss", on]
        run = pipeline.prepare_training(parse_run_config(None, argv))
        assert isinstance(run.trainer.compute_loss_func, HiddenStateLoss) == (on == "true")
        result = run.trainer.train()
        losses.append(result.training_loss)
        weights.append({n: p.detach().clone() for n, p in run.trainer.model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Adam divides each gradient by its own magnitude, so a rounding difference in a near-zero gradient (another
    # summation order) moves a weight by up to lr x 1e-3; the gradients themselves agree to 1e-5 (tests above).
    for name, value in weights[1].items():
        torch.testing.assert_close(
            weights[0][name], value, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_evaluation_loss_comes_from_chunks_and_equals_the_plain_one(arch: str, tiny_model_dir, tmp_path: Path):
    """The evaluation's loss (generation batches) never materialises a batch's full logits; same loss and scores."""
    results, widest = [], []
    for on in ("true", "false"):
        argv = [*family_argv("summarization", tiny_model_dir(arch), tmp_path / on), "--chunked_loss", on,
                "--per_device_eval_batch_size", "4"]
        run = pipeline.prepare_training(parse_run_config(None, argv))
        head = run.trainer.model.get_output_embeddings()
        shapes: list[torch.Size] = []
        handle = head.register_forward_hook(lambda module, args, out, shapes=shapes: shapes.append(out.shape))
        results.append(run.trainer.evaluate())
        handle.remove()
        # positions whose logits one call made (the chunked forward's head returns an empty, 0-wide tensor)
        widest.append(max(shape[:-1].numel() if shape[-1] else 0 for shape in shapes))
    on, off = results
    assert on["eval_loss"] == pytest.approx(off["eval_loss"], rel=1e-5)
    assert {k: v for k, v in on.items() if "rouge" in k} == {k: v for k, v in off.items() if "rouge" in k}
    # Plain: the loss forward makes logits for every position of a batch (4 rows x their length); chunked: only
    # generate's calls, one position per row (prefill keeps the last position), so at most 4.
    assert widest[1] > 4 * 8 and widest[0] <= 4, widest
