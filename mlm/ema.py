"""An exponential moving average (EMA) of the weights, kept beside training (trainer.ema_decay).

After every optimizer step that changed the weights (not one the fp16 loss scaler skipped for an
overflow, not one dropped for a non-finite loss):

    ema = decay * ema + (1 - decay) * weights

with a fixed decay from the first step on, as timm's ModelEmaV2 and torch.optim.swa_utils'
get_ema_multi_avg_fn do. No warmup of the decay (such as min(decay, (1 + t) / (10 + t))): with
one, the value of trainer.ema_decay would mean different averages in runs of different length,
and the average would be the plain rule only late in a run. The price of the fixed decay: the
start weights keep the weight decay**t after t steps (0.999**1000 = 0.37), so the decay must fit
the run's length; `weight_average()` warns when it does not.

The average is fp32 (the weights are fp32 masters under every precision setting: autocast and
FSDP's bf16 param_dtype cast copies of them). Only trainable parameters are averaged; frozen ones
equal their weights anyway. Under runtime.sharding=fsdp every rank averages its own shard (the
DTensor's local tensor), so an update costs no communication and 1/N of the memory; it is the
checkpoint's "ema" piece, which the layout (mlm/parallel.py) saves and loads as it does the model.

Costs: one fp32 copy of the trainable weights, one fused lerp per step (a read of both copies),
and one more evaluate() per eval.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional

import torch

from mlm.parallel import local_tensor

log = logging.getLogger(__name__)


class WeightAverage:
    """fp32 EMA of a model's trainable parameters (each rank's local shard when sharded)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # a tied weight once
        if any(p.dtype != torch.float32 for _, p in trainable):  # a swap into lower precision would round the average
            raise RuntimeError("the weight average expects fp32 weights")
        self.names: List[str] = [name for name, _ in trainable]
        # sharded: the DTensors themselves (FSDP swaps in gathered copies)
        self.params: List[torch.nn.Parameter] = [p for _, p in trainable]
        with torch.no_grad():
            self.averages: List[torch.Tensor] = [local_tensor(p).detach().clone() for p in self.params]

    def _weights(self) -> List[torch.Tensor]:
        with torch.no_grad():
            return [local_tensor(p) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """ema += (1 - decay) * (weights - ema), one fused kernel over all tensors."""
        torch._foreach_lerp_(self.averages, self._weights(), 1.0 - self.decay)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average over from the current weights."""
        torch._foreach_copy_(self.averages, self._weights())

    @torch.no_grad()
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """name -> the average, as a checkpoint's "ema" piece (mlm/checkpoint.py) holds it: the whole tensor when
        replicated; when sharded, this rank's shard as a DTensor laid out like its parameter (sharing the average's
        memory), so torch.distributed.checkpoint saves, loads in place and reshards it as it does the model."""
        from mlm.parallel import is_sharded

        if not any(is_sharded(p) for p in self.params):
            return dict(zip(self.names, self.averages))
        from torch.distributed.tensor import DTensor

        return {
            name: DTensor.from_local(average, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            for name, p, average in zip(self.names, self.params, self.averages)
        }

    @torch.no_grad()
    def load_state_dict(self, saved: Dict[str, torch.Tensor]) -> None:
        """Copy a saved average in (its names are this model's trainable parameters': checked by the layout)."""
        for name, average in zip(self.names, self.averages):
            average.copy_(local_tensor(saved[name]))

    def restart_from(self, checkpoint) -> None:
        """A checkpoint without a weight average (resume=<a run's checkpoint with trainer.ema_decay=0>): the average
        starts from the resumed weights."""
        log.warning(
            "checkpoint %s holds no weight average; the average (trainer.ema_decay=%g) starts from its weights",
            checkpoint,
            self.decay,
        )
        self.restart()

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange weights and averages in place, one tensor at a time (extra memory: the largest tensor)."""
        for weight, average in zip(self._weights(), self.averages):
            held = weight.clone()
            weight.copy_(average)
            average.copy_(held)

    @contextlib.contextmanager
    def swapped_in(self, layout):
        """The averaged weights in the model for the duration (e.g. an eval), the trained ones back after, bit for bit.

        The layout drops gathered copies of the weights before and after (FSDP keeps the root's after a
        forward without backward), so neither the eval nor the next training step sees stale ones."""
        layout.reshard()
        self.swap()
        try:
            yield
        finally:
            layout.reshard()
            self.swap()


def weight_average(model: torch.nn.Module, decay: float, steps: int) -> Optional[WeightAverage]:
    """The run's weight average, or None with trainer.ema_decay=0. Warns when the start weights would
    still weigh more than 5% in the average at the end of the run's `steps` steps."""
    if decay == 0:
        return None
    start_share = decay**steps
    if start_share > 0.05:
        fix = (
            f"lower trainer.ema_decay to {1 - 3 / steps:.4g} or less, or train longer" if steps > 3 else "train longer"
        )
        log.warning(
            "trainer.ema_decay=%g averages over about %.0f steps: after this run's %d steps the start weights still make up "
            "%.0f%% of the average; %s",
            decay,
            1 / (1 - decay),
            steps,
            100 * start_share,
            fix,
        )
    return WeightAverage(model, decay)
