"""A cheaper dropout for CPU training (`trainer.fast_dropout=true`).

torch's CPU dropout draws one Bernoulli sample per element (the largest non-matmul cost of a CPU
step with dropout on). Here one 64-bit draw of the global generator gives four 16-bit uniform
integers, each deciding one element: the same distribution with the drop rate rounded to a
multiple of 1/65536 (0.1 -> 0.0999908). Seeded, checkpointed and resumed like any other draw of the
CPU generator. Other devices keep torch's own fused dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LANES = 4  # 16-bit lanes per 64-bit draw


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """Boolean mask with P(False) = round(p * 65536) / 65536, from numel / 4 draws of 64 random bits."""
    n = math.prod(shape)
    words = torch.empty((n + LANES - 1) // LANES, dtype=torch.int64, device=device).random_(-(2**63), None)
    threshold = -(2**15) + round(p * 2**16)
    return words.view(torch.int16)[:n].view(shape) >= threshold


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """nn.Dropout with the cheaper CPU mask (same p, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout with p > 0 for FastDropout in place; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = FastDropout
            swapped += 1
    return swapped
