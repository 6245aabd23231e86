"""Model building, the MLM objective (sparse == dense), evaluation, and offline failures."""

import math
import time

import numpy as np
import pytest
import torch

from mlm.config import MaskingConfig, ModelConfig, UserError
from mlm.masking import MLMCollator
from mlm.models import MLMObjective, build_model
from tests.conftest import compose


@pytest.fixture(scope="module")
def tiny():
    cfg = compose(["model=tiny"])
    return build_model(cfg.model, 64, seed=0)


def masked_batch(tokenizer, n=8, length=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, size=(n, length))
    return MLMCollator(tokenizer, MaskingConfig(), seed=seed)({"input_ids": ids, "index": np.arange(n)})


def test_sparse_prediction_equals_dense_loss_in_fp32(tiny):
    model, tokenizer = tiny
    batch = masked_batch(tokenizer)
    torch.manual_seed(0)
    model.eval()
    sparse = MLMObjective(model, sparse=True)(**batch)
    dense = MLMObjective(model, sparse=False)(**batch)
    hf_loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # Hugging Face's own MLM loss
    assert sparse[1] == dense[1] > 0
    assert sparse[0].item() == pytest.approx(dense[0].item(), rel=1e-5)
    assert (sparse[0] / sparse[1]).item() == pytest.approx(hf_loss.item(), rel=1e-5)
    assert sparse[2] == dense[2]
    # and the gradients agree
    model.zero_grad()
    MLMObjective(model, sparse=True)(**batch)[0].backward()
    g_sparse = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    MLMObjective(model, sparse=False)(**batch)[0].backward()
    for a, (name, p) in zip(g_sparse, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_loss_stays_fp32_and_close(tiny):
    model, tokenizer = tiny
    model.eval()
    batch = masked_batch(tokenizer)
    fp32 = MLMObjective(model, sparse=True)(**batch)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = MLMObjective(model, sparse=True)(**batch)[0]
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.02)


def test_sdpa_attention_is_used_and_matches_eager():
    cfg = compose(["model=tiny"])
    model, tokenizer = build_model(cfg.model, 64, seed=0)
    assert model.config._attn_implementation == "sdpa"
    cfg.model.attn_implementation = "eager"
    eager, _ = build_model(cfg.model, 64, seed=0)
    batch = masked_batch(tokenizer)
    model.eval(), eager.eval()
    torch.testing.assert_close(
        MLMObjective(model, True)(**batch)[0], MLMObjective(eager, True)(**batch)[0], rtol=1e-5, atol=1e-5
    )


def test_dropout_override():
    cfg = compose(["model=tiny", "model.dropout=0"])
    model, _ = build_model(cfg.model, 64, seed=0)
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    cfg = compose(["model=tiny"])
    model, _ = build_model(cfg.model, 64, seed=0)
    assert model.config.hidden_dropout_prob == 0.1  # unset keeps the config's value


def test_pretrained_default_loads_offline_with_new_head():
    model, tokenizer = build_model(ModelConfig(), 128, seed=0)
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert tokenizer.mask_token == "[MASK]"


def test_unreachable_hub_model_fails_fast_with_one_clear_line():
    start = time.perf_counter()
    with pytest.raises(UserError, match="hub is unreachable") as info:
        build_model(ModelConfig(name_or_path="distilbert/distilroberta-base"), 128, seed=0)
    assert time.perf_counter() - start < 60  # a guard against retry loops, not a speed measurement
    assert "\n" not in str(info.value) and "model.name_or_path" in str(info.value)


def test_model_directory_without_tokenizer(tmp_path, tiny):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no tokenizer files"):
        build_model(ModelConfig(name_or_path=str(tmp_path)), 64, seed=0)


def test_evaluation_is_deterministic_and_normalised_per_token(tiny, tokenizer, capsys):
    """Two evals give the same number; perplexity = exp(total loss / total masked tokens)."""
    from accelerate import Accelerator
    from datasets import Dataset

    from mlm.evaluate import evaluate

    model, _ = tiny
    rng = np.random.default_rng(0)
    blocks = Dataset.from_dict({"input_ids": rng.integers(1000, 20000, size=(37, 64)).astype(np.int32)})
    acc = Accelerator(cpu=True)
    objective = MLMObjective(model, sparse=True)
    first = evaluate(objective, blocks, tokenizer, MaskingConfig(), 0, acc, batch_size=8)
    second = evaluate(
        objective, blocks, tokenizer, MaskingConfig(), 0, acc, batch_size=5, bar="eval at step 0"
    )  # other batching, same masks
    assert first["eval/perplexity"] == pytest.approx(second["eval/perplexity"], rel=1e-6)
    bar = capsys.readouterr().err  # a bar over the 8 batches of the titled eval only
    assert "eval at step 0" in bar and "/8 " in bar and "/5 " not in bar  # the untitled eval (5 batches) shows none
    # reference: Hugging Face's model loss over all masked tokens at once
    from mlm.masking import EVAL_STREAM

    batch = MLMCollator(tokenizer, MaskingConfig(), seed=0, stream=EVAL_STREAM)(
        {"input_ids": np.asarray(blocks["input_ids"]), "index": np.arange(37)}
    )
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert first["eval/loss"] == pytest.approx(ref, rel=1e-5)
    assert first["eval/perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    assert first["eval/masked_tokens"] == int((batch["labels"] != -100).sum())


def test_freeze_embeddings_keeps_tied_table_fixed(tokenizer):
    from mlm.config import OptimizerConfig
    from mlm.optim import build_optimizer

    cfg = compose(["model=tiny", "model.freeze_embeddings=true"])
    model, _ = build_model(cfg.model, 64, seed=0)
    table = model.get_input_embeddings().weight
    assert not table.requires_grad and model.get_output_embeddings().weight is table
    before, bias_before = table.detach().clone(), model.cls.predictions.bias.detach().clone()
    objective = MLMObjective(model, sparse=True)
    opt = build_optimizer(objective, OptimizerConfig(lr=1e-2))
    loss, n, _ = objective(**masked_batch(tokenizer))
    (loss / n).backward()
    opt.step()
    assert torch.equal(table, before) and not torch.equal(model.cls.predictions.bias, bias_before)


TINY_DISTILBERT = ModelConfig(
    source="scratch", arch={"model_type": "distilbert", "n_layers": 2, "dim": 32, "n_heads": 2, "hidden_dim": 64}
)


@pytest.mark.parametrize("model_cfg", [TINY_DISTILBERT, "tiny_modernbert"], ids=["distilbert", "modernbert"])
def test_sparse_prediction_for_distilbert_and_modernbert(model_cfg, tokenizer):
    """Sparse head == the model's own dense MLM loss (fp32), with padding in the batch; gradients too."""
    if isinstance(model_cfg, str):
        model_cfg = compose([f"model={model_cfg}"]).model
    model, _ = build_model(model_cfg, 64, seed=0)
    model.eval()
    ids = np.random.default_rng(1).integers(1000, 20000, size=(6, 64))
    ids[2, 40:] = tokenizer.pad_token_id  # a padded block: the attention mask must reach the encoder
    batch = MLMCollator(tokenizer, MaskingConfig(), seed=0)({"input_ids": ids, "index": np.arange(6)})
    assert "attention_mask" in batch
    objective = MLMObjective(model, sparse=True)
    assert objective.sparse  # wired, not the dense fallback
    sparse, dense = objective(**batch), MLMObjective(model, sparse=False)(**batch)
    hf_loss = model(**batch).loss
    assert sparse[1] == dense[1] > 0 and sparse[2] == dense[2]
    assert sparse[0].item() == pytest.approx(dense[0].item(), rel=1e-5)
    assert (sparse[0] / sparse[1]).item() == pytest.approx(hf_loss.item(), rel=1e-5)
    if model.config.model_type == "modernbert":  # and ModernBERT's own sparse path
        model.config.sparse_prediction = model.sparse_prediction = True
        assert (sparse[0] / sparse[1]).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        model.sparse_prediction = False
    model.zero_grad()
    objective(**batch)[0].backward()
    g_sparse = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    MLMObjective(model, sparse=False)(**batch)[0].backward()
    for a, (name, p) in zip(g_sparse, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_modernbert_hub_model_fails_fast_offline():
    cfg = compose(["model=modernbert"])
    with pytest.raises(UserError, match="'answerdotai/ModernBERT-base'.*hub is unreachable") as info:
        build_model(cfg.model, 128, seed=0)
    assert "\n" not in str(info.value)


def test_eval_masks_tokens_whatever_the_training_strategy(tiny):
    """Evals use masking.eval_strategy (token by default): span-trained and token-trained runs score the same task."""
    from accelerate import Accelerator
    from datasets import Dataset

    from mlm.evaluate import evaluate

    model, tokenizer = tiny
    blocks = Dataset.from_dict(
        {"input_ids": np.random.default_rng(0).integers(1000, 20000, size=(24, 64)).astype(np.int32)}
    )
    objective, acc = MLMObjective(model, sparse=True), Accelerator(cpu=True)
    token = evaluate(objective, blocks, tokenizer, MaskingConfig(), 0, acc, batch_size=8)
    span_trained = evaluate(objective, blocks, tokenizer, MaskingConfig(strategy="span"), 0, acc, batch_size=8)
    span_eval = evaluate(
        objective, blocks, tokenizer, MaskingConfig(strategy="span", eval_strategy="span"), 0, acc, batch_size=8
    )
    assert span_trained == token
    assert span_eval["eval/loss"] != token["eval/loss"]


def test_predict_with_two_masks_keeps_the_other_mask_in_each_filled_in_sentence(tiny):
    from mlm.predict import fill_mask, format_predictions

    model, tokenizer = tiny
    text = "The <mask> sat on the [MASK]."
    first, second = fill_mask(model, tokenizer, text, top_k=2)
    for c in first:
        assert c["sequence"] == f"the {c['token']} sat on the [MASK]."
    for c in second:
        assert c["sequence"] == f"the [MASK] sat on the {c['token']}."
    shown = format_predictions(text, [first, second]).splitlines()
    assert shown[1] == "  mask 1:" and shown[2].endswith(f"the {first[0]['token']} sat on the [MASK].")
