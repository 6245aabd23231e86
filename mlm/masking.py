"""MLM masking: which tokens to predict, and what the model sees in their place.

Every random draw is a hash of (seed, stream, example index, position), computed with integer
tensor ops over the whole batch. So an example's mask depends only on those four numbers, never
on the process, the worker or the batch it lands in:
- training uses stream = epoch, so masks change every epoch (dynamic masking, as in RoBERTa);
- evaluation uses a fixed stream, so every eval of a model on a data set scores the same masks;
- a 2-process run masks exactly like a 1-process run, and a resumed run like an uninterrupted one.

Three strategies choose the positions (`masking.strategy`), all with the same guarantees and an
expected masked fraction of exactly `mlm_probability` (of the non-special tokens):
- token: each token on its own (BERT, Hugging Face's DataCollatorForLanguageModeling);
- whole_word: each word with all its pieces; word starts come from the token ids alone through a
  per-vocabulary table (`word_start_table`);
- span: SpanBERT-style runs of whole words with clipped geometric lengths (`span_mask`).
The 80/10/10 replacement is drawn per token for `token` and once per word or span for the others,
so a word is never half [MASK] and half original. `masking.schedule` moves the rate over training
(`scheduled_probability`); evaluation always uses the fixed `mlm_probability`.

`python -m mlm.mask_preview --show "some sentence"` prints one sentence masked by each strategy
(mlm/mask_preview.py, which also plots the mask-rate schedules).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from mlm.config import MaskingConfig, UserError, span_length_mean
from mlm.schedules import SCHEDULES

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


def word_start_table(tokenizer) -> torch.Tensor:
    """(vocab,) bool: does this token id begin a word? Built once per tokenizer from the token strings.

    WordPiece marks continuations (`##ing`); byte-level BPE (RoBERTa, ModernBERT) marks word starts
    with a leading-space byte (`Ġthe`); SentencePiece with `▁`. The marker that most tokens carry
    decides the convention. Special tokens count as starts (they are never masked anyway).
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    tokens = [t or "" for t in tokens]
    counts = {m: sum(t.startswith(m) for t in tokens) for m in ("##", "\u0120", "\u2581")}
    marker = max(counts, key=counts.get)
    if counts[marker] == 0:
        raise UserError(
            f"cannot tell word starts from the vocabulary of {type(tokenizer).__name__} (no ##, \u0120 or \u2581 pieces); "
            "use masking.strategy=token"
        )
    if marker == "##":
        starts = [not t.startswith("##") for t in tokens]
    else:
        starts = [t.startswith(marker) for t in tokens]
    table = torch.tensor(starts, dtype=torch.bool)
    table[torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)] = True
    return table


def word_starts(input_ids: torch.Tensor, special: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the first token of every word. A block's first token and the token after
    a special one start a word whatever their spelling (a BPE document starts without a space)."""
    starts = table[input_ids] | special
    starts[:, 0] = True
    starts[:, 1:] |= special[:, :-1]
    return starts


def _clipped_geometric_cdfs(p: float, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CDFs of the span length L (P(L=l) = p(1-p)^(l-1), l < max_len; the tail mass sits at max_len)
    and of the residual length R of the span that covers a given word (P(R=r) = P(L>=r) / E[L])."""
    survival = torch.tensor([(1 - p) ** k for k in range(max_len)], dtype=torch.float64)  # P(L > k), k < max_len
    pmf = survival - torch.cat([survival[1:], torch.zeros(1, dtype=torch.float64)])
    return torch.cumsum(pmf, 0), torch.cumsum(survival / survival.sum(), 0)


def _inverse_cdf(u: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """Draws in 1..len(cdf) from uniforms u (float64), by counting the CDF steps below u."""
    return 1 + (u[..., None] >= cdf[:-1]).sum(-1)


def span_segments(length: int) -> int:
    """Segments drawn per row: the first spans >= 1 word, every later one >= 2, so this many pass the row's end."""
    return length // 2 + 2


def span_mask(
    starts: torch.Tensor, index: torch.Tensor, *, seed: int, stream: int, probability: float, p: float, max_len: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SpanBERT-style span selection over words, vectorised and hash-seeded.

    Each row's words are cut into segments (gap, span), drawn independently per segment number:
      1. span lengths L in words: geometric(p) clipped at max_len, by inverse CDF of a hashed uniform;
      2. gaps G >= 1 word: geometric with mean E[L](1 - q)/q, so spans never touch and the expected
         masked share of words is E[L] / (E[G] + E[L]) = q;
      3. the first segment starts the process in its stationary state: with probability q word 0
         lies inside a span (of residual length R, P(R=r) = P(L>=r)/E[L]), else inside a gap (the
         geometric gap is memoryless). So every word, first or last, is masked with probability q;
      4. segment ends are a cumulative sum; `searchsorted` finds each word's segment, and a word is
         masked when it lies past its segment's gap.
    Returns (masked, segment) per token; `segment` lets the caller draw one 80/10/10 decision per span.
    The masked fraction equals q in expectation, not per row (as token masking is Bernoulli per token).
    """
    batch, length = starts.shape
    word = torch.cumsum(starts.to(torch.int64), 1) - 1  # word number of each token, per row
    n_seg = span_segments(length)
    cdf_len, cdf_res = _clipped_geometric_cdfs(p, max_len)
    mean_len = span_length_mean(p, max_len)
    gap_p = min(1.0, probability / (mean_len * (1 - probability)))  # success probability of G ~ Geometric(>= 1)

    def uniform(salt: int) -> torch.Tensor:
        return random_uniform(seed, stream, index, n_seg, salt).to(torch.float64)

    u_len, u_gap, u_state = uniform(3), uniform(4), uniform(5)
    lengths = _inverse_cdf(u_len, cdf_len)
    gaps = 1 + (
        torch.floor(torch.log1p(-u_gap) / math.log1p(-gap_p)).to(torch.int64)
        if gap_p < 1
        else torch.zeros_like(lengths)
    )
    in_span = u_state[:, 0] < probability  # step 3: the state at word 0
    gaps[:, 0] = torch.where(in_span, 0, gaps[:, 0])
    lengths[:, 0] = torch.where(in_span, _inverse_cdf(u_len[:, 0], cdf_res), lengths[:, 0])
    seg_end = torch.cumsum(gaps + lengths, 1)
    segment = torch.searchsorted(seg_end, word, right=True).clamp(max=n_seg - 1)
    masked = word >= (seg_end - lengths).gather(1, segment)
    return masked, segment


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
    word_table: Optional[torch.Tensor] = None,
    probability: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """BERT masking over a (batch, length) tensor; returns the model inputs and labels (-100 = not predicted).

    1. choose non-special tokens: each token (strategy=token), each word (whole_word) with
       probability `probability` (default cfg.mlm_probability), or spans of words (span);
    2. of those, mask_replace_prob become the mask token, random_replace_prob a uniformly random token
       (any id below vocab_size, as Hugging Face's collator does), the rest stay as they are; the
       draw is per token for `token`, per word or per span otherwise.
    `word_table` (from `word_start_table`) is needed by whole_word and span.
    """
    batch, length = input_ids.shape
    q = cfg.mlm_probability if probability is None else probability
    special = torch.isin(input_ids, special_ids)
    candidates = ~special
    if cfg.strategy == "token":
        chosen = (random_uniform(seed, stream, index, length, 0) < q) & candidates
        how = random_uniform(seed, stream, index, length, 1)
    else:
        starts = word_starts(input_ids, special, word_table)
        if cfg.strategy == "whole_word":
            # every token reads the draws at its word's first position
            first = torch.cummax(torch.where(starts, torch.arange(length), 0), 1).values
            chosen = (random_uniform(seed, stream, index, length, 0).gather(1, first) < q) & candidates
            how = random_uniform(seed, stream, index, length, 1).gather(1, first)
        else:
            chosen, segment = span_mask(
                starts,
                index,
                seed=seed,
                stream=stream,
                probability=q,
                p=cfg.span_geometric_p,
                max_len=cfg.span_max_words,
            )
            chosen &= candidates
            how = random_uniform(seed, stream, index, span_segments(length), 1).gather(1, segment)  # one draw per span
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


def scheduled_probability(cfg: MaskingConfig, progress: float) -> float:
    """The training mask rate at a fraction of training (0 -> 1): train_probability (or
    mlm_probability) -> final_probability.

    The shapes are the learning-rate decays of mlm/schedules.py turned upside down (0 -> 1), so
    `linear` and `cosine` mean the same curve in both groups.
    """
    start = cfg.mlm_probability if cfg.train_probability is None else cfg.train_probability
    final = start if cfg.final_probability is None else cfg.final_probability
    travelled = 1.0 - SCHEDULES[cfg.schedule](min(1.0, max(0.0, progress)))
    return start + (final - start) * travelled


class MLMCollator:
    """Turns {'input_ids': (B, L) int array, 'index': (B,)} into masked model inputs.

    `stream` is set by the training loop to the epoch before each pass (and to EVAL_STREAM for
    evaluation collators); `probability` to the scheduled rate before each step (evaluation
    collators keep cfg.mlm_probability). An `attention_mask` is only returned when a batch holds padding, so
    the common all-full batch runs the attention kernels without a mask. Blocks with `document_positions`
    (dataset.document_attention) return them as `position_ids` instead, and no attention_mask: the model's
    forward (mlm.models.MLMObjective) builds the block-diagonal mask from them, a pad token its own document.
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
        self.probability = cfg.mlm_probability
        self.word_table = word_start_table(tokenizer) if cfg.strategy != "token" else None

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.int64)
        index = torch.as_tensor(np.asarray(batch["index"]), dtype=torch.int64)
        out = mask_tokens(
            input_ids,
            index,
            seed=self.seed,
            stream=self.stream,
            cfg=self.cfg,
            special_ids=self.special_ids,
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            word_table=self.word_table,
            probability=self.probability,
        )
        out["masked_positions"] = masked_positions_of(out["labels"])  # on the host: no device sync later
        if "document_positions" in batch:  # dataset.document_attention: the model masks by document (pads included)
            out["position_ids"] = torch.as_tensor(np.asarray(batch["document_positions"]), dtype=torch.int64)
        elif self.pad_token_id is not None and bool((input_ids == self.pad_token_id).any()):
            out["attention_mask"] = (input_ids != self.pad_token_id).to(torch.int64)
        return out
