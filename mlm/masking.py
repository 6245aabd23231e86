"""MLM masking: which tokens to predict, and what the model sees in their place.

Every random draw is a hash of (seed, stream, example index, position), computed with integer
tensor ops over the whole batch. So an example's mask depends only on those four numbers, never
on the process, the worker or the batch it lands in:
- training uses stream = epoch, so masks change every epoch (dynamic masking, as in RoBERTa);
- evaluation uses a fixed stream, so every eval of a model on a data set scores the same masks;
- a 2-process run masks exactly like a 1-process run, and a resumed run like an uninterrupted one.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from mlm.config import MaskingConfig

EVAL_STREAM = 1 << 30  # larger than any epoch number, so eval masks never equal a training epoch's
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, split in 16-bit halves so no int64 product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32): consecutive inputs give independent-looking outputs."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(seed: int, stream: int, index: torch.Tensor, length: int, salt: int) -> torch.Tensor:
    """Uniform 32-bit integers (as int64), shape (len(index), length), a pure function of the arguments."""
    key = _hash32(torch.tensor(seed, dtype=torch.int64) ^ _hash32(torch.tensor(stream * 3 + salt, dtype=torch.int64)))
    rows = _hash32(key ^ _hash32(index.to(torch.int64) + 0x9E3779B9))  # one key per example
    cols = torch.arange(length, dtype=torch.int64)
    return _hash32(rows[:, None] ^ _hash32(cols + 0x632BE5AB)[None, :])


def random_uniform(seed: int, stream: int, index: torch.Tensor, length: int, salt: int) -> torch.Tensor:
    """Uniform floats in [0, 1) from the top 24 bits (exact in float32)."""
    return (random_bits(seed, stream, index, length, salt) >> 8).to(torch.float32) / float(1 << 24)


def mask_tokens(
    input_ids: torch.Tensor,
    index: torch.Tensor,
    *,
    seed: int,
    stream: int,
    cfg: MaskingConfig,
    special_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
) -> Dict[str, torch.Tensor]:
    """BERT masking over a (batch, length) tensor; returns the model inputs and labels (-100 = not predicted).

    1. choose each non-special token with probability mlm_probability;
    2. of those, mask_replace_prob become the mask token, random_replace_prob a uniformly random token
       (any id below vocab_size, as Hugging Face's collator does), the rest stay as they are.
    """
    batch, length = input_ids.shape
    candidates = ~torch.isin(input_ids, special_ids)
    chosen = (random_uniform(seed, stream, index, length, 0) < cfg.mlm_probability) & candidates
    how = random_uniform(seed, stream, index, length, 1)
    to_mask = chosen & (how < cfg.mask_replace_prob)
    to_random = chosen & (how >= cfg.mask_replace_prob) & (how < cfg.mask_replace_prob + cfg.random_replace_prob)
    random_tokens = random_bits(seed, stream, index, length, 2) % vocab_size

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(to_random, random_tokens, inputs)
    return {"input_ids": inputs, "labels": labels}


def masked_positions_of(labels: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) indices of the positions to predict (label != -100), in the labels' order."""
    return (labels.reshape(-1) != -100).nonzero().squeeze(1)


class MLMCollator:
    """Turns {'input_ids': (B, L) int array, 'index': (B,)} into masked model inputs.

    `stream` is set by the training loop to the epoch before each pass (and to EVAL_STREAM for
    evaluation collators). An `attention_mask` is only returned when a batch holds padding, so
    the common all-full batch runs the attention kernels without a mask.
    """

    def __init__(self, tokenizer, cfg: MaskingConfig, seed: int, stream: int = 0):
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; MLM needs one")
        self.cfg = cfg
        self.seed = seed
        self.stream = stream
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.int64)
        index = torch.as_tensor(np.asarray(batch["index"]), dtype=torch.int64)
        out = mask_tokens(
            input_ids, index, seed=self.seed, stream=self.stream, cfg=self.cfg,
            special_ids=self.special_ids, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
        )
        out["masked_positions"] = masked_positions_of(out["labels"])  # on the host: no device sync later
        if self.pad_token_id is not None and bool((input_ids == self.pad_token_id).any()):
            out["attention_mask"] = (input_ids != self.pad_token_id).to(torch.int64)
        return out
