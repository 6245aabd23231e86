"""Which blocks each process reads at each step: a deterministic global order, sharded by rank.

The order of training blocks is a permutation drawn from (seed, epoch). Each optimizer step
consumes one *global batch* of `per_device_batch_size x gradient_accumulation_steps x processes`
blocks from it; micro-batch m of rank r takes its own slice. So the blocks that make up a step do
not depend on how they are split over processes or accumulation steps, and a resumed run can
start at any step by arithmetic alone (no data is replayed to find the position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List

import numpy as np
import torch
from datasets import Dataset


class IndexedBlocks(torch.utils.data.Dataset):
    """Blocks by index, fetched a whole batch at a time (one Arrow `take`, no per-item Python)."""

    def __init__(self, blocks: Dataset):
        self.blocks = blocks.with_format("numpy")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitems__(self, indices: List[int]) -> Dict[str, np.ndarray]:
        # every column: input_ids, and document_positions where dataset.document_attention made them
        batch = {name: np.stack(column) for name, column in self.blocks[indices].items()}
        batch["index"] = np.asarray(indices, dtype=np.int64)
        return batch

    def __getitem__(self, i: int):  # pragma: no cover - the loaders below always fetch batches
        return self.__getitems__([i])


@dataclass
class TrainOrder:
    """The global order of training blocks, per epoch and per step."""

    num_blocks: int
    micro_batch: int  # blocks per process per micro-batch
    accumulation: int  # micro-batches per optimizer step
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # a last partial global batch is dropped, so every step has the same shape on every process
        return self.num_blocks // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def micro_batches(self, perm: np.ndarray, step_in_epoch: int, rank: int) -> List[List[int]]:
        """Block indices of each micro-batch of one optimizer step, on one rank (micro-major, then rank)."""
        start = step_in_epoch * self.global_batch
        return [
            perm[start + (m * self.world_size + rank) * self.micro_batch :][: self.micro_batch].tolist()
            for m in range(self.accumulation)
        ]


class TrainSampler(torch.utils.data.Sampler):
    """Yields one rank's micro-batches for one epoch, from `start_step` on (for resume)."""

    def __init__(self, order: TrainOrder, epoch: int, rank: int, start_step: int = 0):
        self.order, self.epoch, self.rank, self.start_step = order, epoch, rank, start_step

    def __iter__(self) -> Iterator[List[int]]:
        perm = self.order.permutation(self.epoch)
        for step in range(self.start_step, self.order.steps_per_epoch):
            yield from self.order.micro_batches(perm, step, self.rank)

    def __len__(self) -> int:
        return (self.order.steps_per_epoch - self.start_step) * self.order.accumulation


def eval_shard(num_blocks: int, batch_size: int, rank: int, world_size: int) -> List[List[int]]:
    """Contiguous, disjoint shards of the eval set: every block is scored once, none twice."""
    lo, hi = rank * num_blocks // world_size, (rank + 1) * num_blocks // world_size
    return [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]


def eval_batch_count(num_blocks: int, batch_size: int, world_size: int) -> int:
    """Eval batches every rank runs: those of the largest shard (ceil(num_blocks / world_size) blocks).

    Shards differ by at most one block, so some ranks have one batch fewer; they run a padding
    batch that counts for nothing, because a sharded model gathers its weights inside every forward
    (a collective) and a rank that stopped early would leave the others waiting forever."""
    return math.ceil(math.ceil(num_blocks / world_size) / batch_size)


def make_loader(
    blocks: Dataset, batch_sampler, collate_fn, num_workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    # A private generator: creating a loader iterator draws a worker seed, and drawing it from the
    # global RNG would shift the dropout stream every eval or epoch (and break exact resume).
    return torch.utils.data.DataLoader(
        IndexedBlocks(blocks),
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
