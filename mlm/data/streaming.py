"""Training straight from a stream of documents (dataset.streaming=true): no preprocessing pass.

The corpus is read in source order (`sources.iter_documents(streaming=True)`):
1. the first `dataset.streaming_eval_docs` documents are held out; their blocks are the eval set,
   the same in every run;
2. the rest is cut into batches of `tokenize_batch_size` documents, and batch b belongs to shard
   b % S, with S = processes x dataloader workers and shard = rank x workers + worker. A shard
   tokenizes only its own batches and packs them into blocks (remainders carried from batch to
   batch), so each block is made, and trained on, by exactly one process. Every shard reads the
   whole stream: skipping the other shards' batches costs reading, not tokenizing;
3. block j of shard s gets the global index j x S + s, so masks stay a hash of (seed, index) as
   in the preprocessed path;
4. at the end of the stream a shard starts a new pass (its blocks get new indices, so new masks).
Resume: a process's position is the number of micro-batches it has consumed (step x accumulation,
stored in the checkpoint). A resumed shard re-reads and re-tokenizes its part of the stream up to
that position and drops those blocks: the same blocks as an uninterrupted run, at the cost of
tokenizing again what was already trained on (no model compute). It needs the same number of
processes and workers (checked), since they decide the shards.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterator, Tuple

import numpy as np
import torch
from datasets import Dataset

from mlm.config import DatasetConfig, UserError
from mlm.data.blocks import BLOCK_FEATURES, encode_batches, pack_blocks, pad_id_of
from mlm.data.sources import batched, iter_documents

log = logging.getLogger(__name__)


def stream_eval_blocks(cfg: DatasetConfig, tokenizer, block_size: int) -> Dataset:
    """Blocks of the first `streaming_eval_docs` documents (in memory: a small, fixed held-out set)."""
    # one more: is any left?
    docs = list(itertools.islice(iter_documents(cfg, streaming=True), cfg.streaming_eval_docs + 1))
    if len(docs) <= cfg.streaming_eval_docs:
        raise UserError(
            f"dataset.streaming_eval_docs={cfg.streaming_eval_docs} holds out the first {cfg.streaming_eval_docs} documents for eval, "
            f"and the stream has {len(docs)}: none is left to train on; "
            + (
                f"set dataset.streaming_eval_docs below {len(docs)} (e.g. {max(1, len(docs) // 10)})"
                if len(docs) > 1
                else "streaming needs at least 2 documents (one to eval, one to train on)"
            )
        )
    pieces = (ids for ids, _ in encode_batches(batched(docs[:-1], cfg.tokenize_batch_size), tokenizer))
    blocks = list(pack_blocks(pieces, block_size, cfg.remainder, pad_id_of(tokenizer)))
    if not blocks:
        raise UserError(
            f"the first dataset.streaming_eval_docs={cfg.streaming_eval_docs} documents do not fill one block of "
            f"block_size={block_size}; raise dataset.streaming_eval_docs or use dataset.remainder=keep"
        )
    blocks = np.concatenate(blocks)
    log.info(
        "streaming %s: the first %d documents are the eval set (%d blocks); training blocks are made on the fly from the rest",
        cfg.path or cfg.kind,
        cfg.streaming_eval_docs,
        len(blocks),
    )
    return Dataset.from_dict({"input_ids": blocks}, features=BLOCK_FEATURES)


def shard_batches(cfg: DatasetConfig, shard: int, num_shards: int) -> Iterator[list]:
    """The training documents of one shard, a tokenizer batch at a time (one pass over the stream)."""
    docs = itertools.islice(iter_documents(cfg, streaming=True), cfg.streaming_eval_docs, None)
    return (batch for b, batch in enumerate(batched(docs, cfg.tokenize_batch_size)) if b % num_shards == shard)


def shard_blocks(
    cfg: DatasetConfig, tokenizer, block_size: int, shard: int, num_shards: int
) -> Iterator[Tuple[int, np.ndarray]]:
    """(global index, block) of one shard, pass after pass, forever."""
    j = 0
    for _ in itertools.count():
        start = j
        pieces = (ids for ids, _ in encode_batches(shard_batches(cfg, shard, num_shards), tokenizer))
        for blocks in pack_blocks(pieces, block_size, cfg.remainder, pad_id_of(tokenizer)):
            for row in blocks:
                yield j * num_shards + shard, row
                j += 1
        if j == start:
            raise UserError(
                f"streaming shard {shard} of {num_shards} (processes x runtime.num_workers) got no block of block_size={block_size}; "
                "use more data, fewer processes or workers, a smaller dataset.tokenize_batch_size, or dataset.remainder=keep"
            )


class BlockStream(torch.utils.data.IterableDataset):
    """One process's micro-batches {'input_ids': (B, L), 'index': (B,)}, from micro-batch `start_batches` on."""

    def __init__(
        self,
        cfg: DatasetConfig,
        tokenizer,
        block_size: int,
        micro_batch: int,
        rank: int,
        world_size: int,
        start_batches: int = 0,
    ):
        self.cfg, self.tokenizer, self.block_size, self.micro_batch = cfg, tokenizer, block_size, micro_batch
        self.rank, self.world_size, self.start_batches = rank, world_size, start_batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # A DataLoader takes micro-batches from its workers in turn, starting with worker 0: micro-batch
        # g comes from the worker playing role g % workers, so a loader that starts at micro-batch
        # `start_batches` gives worker w the role (w + start_batches) % workers, and that role has
        # made len(range(role, start_batches, workers)) micro-batches already.
        role = (worker + self.start_batches) % workers
        skip = len(range(role, self.start_batches, workers))
        blocks = shard_blocks(
            self.cfg, self.tokenizer, self.block_size, self.rank * workers + role, self.world_size * workers
        )
        for batch in batched(itertools.islice(blocks, skip * self.micro_batch, None), self.micro_batch):
            index, ids = zip(*batch)
            yield {"input_ids": np.stack(ids), "index": np.asarray(index, dtype=np.int64)}


def stream_loader(stream: BlockStream, collate_fn, num_workers: int) -> torch.utils.data.DataLoader:
    # batch_size=None: the stream yields whole micro-batches; a private generator as in batching.make_loader
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
