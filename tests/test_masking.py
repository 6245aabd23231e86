"""Masking statistics, determinism, and agreement with Hugging Face's DataCollatorForLanguageModeling."""

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from mlm.config import MaskingConfig
from mlm.masking import EVAL_STREAM, MLMCollator


@pytest.fixture(scope="module")
def blocks(tokenizer):
    """4000 blocks of 64 real-looking token ids, with [CLS]/[SEP] inside as in grouped text."""
    from tests.conftest import sentences

    ids = tokenizer(sentences(6000, seed=3))["input_ids"]
    flat = np.array([t for doc in ids for t in doc], dtype=np.int64)
    n = len(flat) // 64
    return flat[: n * 64].reshape(n, 64)[:4000]


def stats(inputs, labels, original, tokenizer):
    chosen = labels != -100
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    n = chosen.sum().item()
    return {
        "rate": n / (~special).sum().item(),
        "mask": (chosen & (inputs == tokenizer.mask_token_id)).sum().item() / n,
        "unchanged": (chosen & (inputs == original)).sum().item() / n,
        "special_chosen": (chosen & special).sum().item(),
        "labels_match": bool((labels[chosen] == original[chosen]).all()),
        "outside_untouched": bool((inputs[~chosen] == original[~chosen]).all()),
    }


def ours(blocks, tokenizer, cfg=MaskingConfig(), seed=0, stream=0):
    out = MLMCollator(tokenizer, cfg, seed=seed, stream=stream)({"input_ids": blocks, "index": np.arange(len(blocks))})
    return out["input_ids"], out["labels"]


@pytest.mark.parametrize(
    "cfg", [MaskingConfig(), MaskingConfig(mlm_probability=0.3, mask_replace_prob=0.5, random_replace_prob=0.25)]
)
def test_rates_and_80_10_10_split(blocks, tokenizer, cfg):
    inputs, labels = ours(blocks, tokenizer, cfg)
    s = stats(inputs, labels, torch.as_tensor(blocks), tokenizer)
    # ~250k candidate tokens: binomial standard errors are ~0.001, tolerances are >5 sigma
    assert s["rate"] == pytest.approx(cfg.mlm_probability, abs=0.005)
    assert s["mask"] == pytest.approx(cfg.mask_replace_prob, abs=0.01)
    # unchanged = the "keep" share plus random draws that hit the same token (1/vocab)
    keep = 1 - cfg.mask_replace_prob - cfg.random_replace_prob
    assert s["unchanged"] == pytest.approx(keep, abs=0.01)
    assert s["special_chosen"] == 0 and s["labels_match"] and s["outside_untouched"]


def test_same_statistics_as_huggingface_collator(blocks, tokenizer):
    torch.manual_seed(0)
    hf = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)([{"input_ids": b.tolist()} for b in blocks])
    ref = stats(hf["input_ids"], hf["labels"], torch.as_tensor(blocks), tokenizer)
    inputs, labels = ours(blocks, tokenizer)
    mine = stats(inputs, labels, torch.as_tensor(blocks), tokenizer)
    for key in ("rate", "mask", "unchanged"):
        assert mine[key] == pytest.approx(ref[key], abs=0.01), key
    assert mine["special_chosen"] == ref["special_chosen"] == 0
    # which token ids get chosen: no bias towards any part of the vocabulary compared with HF
    chosen_ours = torch.as_tensor(blocks)[labels != -100].float().mean()
    chosen_hf = torch.as_tensor(blocks)[hf["labels"] != -100].float().mean()
    assert abs(chosen_ours - chosen_hf) / chosen_hf < 0.03


def test_positions_are_uniform(blocks, tokenizer):
    _, labels = ours(blocks, tokenizer)
    per_position = (labels != -100).float().mean(0)
    assert per_position.min() > 0.10 and per_position.max() < 0.20


def test_masks_depend_only_on_seed_stream_and_index(blocks, tokenizer):
    collate = MLMCollator(tokenizer, MaskingConfig(), seed=5, stream=2)
    whole = collate({"input_ids": blocks[:8], "index": np.arange(8)})
    # the same examples in another batch composition (as on another rank) get the same masks
    part = collate({"input_ids": blocks[[6, 2]], "index": np.array([6, 2])})
    assert torch.equal(part["labels"], whole["labels"][[6, 2]])
    assert torch.equal(part["input_ids"], whole["input_ids"][[6, 2]])
    again = collate({"input_ids": blocks[:8], "index": np.arange(8)})
    assert torch.equal(again["labels"], whole["labels"])
    collate.stream = 3  # next epoch: new masks
    assert not torch.equal(collate({"input_ids": blocks[:8], "index": np.arange(8)})["labels"], whole["labels"])


def test_eval_stream_differs_from_training_epochs(blocks, tokenizer):
    _, eval_labels = ours(blocks[:64], tokenizer, stream=EVAL_STREAM)
    for epoch in range(3):
        _, train_labels = ours(blocks[:64], tokenizer, stream=epoch)
        assert not torch.equal(eval_labels, train_labels)


def test_padding_is_never_masked_and_gets_attention_mask(tokenizer):
    pad = tokenizer.pad_token_id
    ids = np.full((64, 32), 2000, dtype=np.int64)
    ids[:, 20:] = pad
    out = MLMCollator(tokenizer, MaskingConfig(mlm_probability=0.5), seed=0)({"input_ids": ids, "index": np.arange(64)})
    assert (out["labels"][:, 20:] == -100).all() and (out["input_ids"][:, 20:] == pad).all()
    assert out["attention_mask"][:, :20].all() and not out["attention_mask"][:, 20:].any()
    full = MLMCollator(tokenizer, MaskingConfig(), seed=0)({"input_ids": ids[:, :20], "index": np.arange(64)})
    assert "attention_mask" not in full  # full blocks run without a mask
