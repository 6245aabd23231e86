"""Schedule curves by name: progress through training (0 -> 1) -> a multiplier (1 -> 0 for the decays).

One registry for both schedules that move over a run: the learning rate (`scheduler.name`, scaled
by the curve after warmup, mlm/optim.py) and the mask rate (`masking.schedule`, which travels
1 - curve of the way to its final rate, mlm/masking.py). So `linear` and `cosine` mean the same
shape in both config groups. A leaf module: it imports nothing from mlm.

Warmup-stable-decay (`scheduler.name=wsd`) has its own parts below: where warmup ends and the decay
starts, in steps, and the curve after warmup. The learning-rate schedule and the check that lets a
stable-phase checkpoint start a decay of another length (mlm/rundir.py) both use them.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

SCHEDULES: Dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress: 1.0,
}

DECAY_SHAPES: Dict[
    str, Callable[[float], float]
] = {  # wsd's decay: progress through the decay (0 -> 1) -> multiplier (1 -> 0)
    "linear": lambda x: 1.0 - x,
    "1-sqrt": lambda x: (
        1.0 - math.sqrt(x)
    ),  # falls fast, then flattens (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations")
}


def warmup_length(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """Steps of linear warmup: `warmup_steps` when > 0, else round(warmup_ratio * total_steps)."""
    return warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total_steps))


def decay_start(total_steps: int, decay_ratio: float) -> int:
    """wsd: the last step at the peak, total_steps - round(decay_ratio * total_steps). The multiplier
    after step s (the rate of step s + 1) is 1.0 up to this step and decays over the rest, to 0 after
    the last step; e.g. 20 steps with decay_ratio=0.2: 16, then 0.75, 0.5, 0.25 for steps 18-20."""
    return total_steps - int(round(decay_ratio * total_steps))


def stable_then_decay(at: float, decay_from: float, end: float, shape: str) -> float:
    """wsd after warmup: 1.0 while `at` is at most `decay_from`, then `shape` of the progress through
    the decay, (at - decay_from) / (end - decay_from), down to 0 at `end`. In steps (step, decay_start,
    total steps) or in fractions of training (done, decay_start / total, 1)."""
    if at <= decay_from:
        return 1.0
    return max(0.0, DECAY_SHAPES[shape](min(1.0, (at - decay_from) / (end - decay_from))))
