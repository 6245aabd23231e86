"""Schedule curves by name: progress through training (0 -> 1) -> a multiplier (1 -> 0 for the decays).

One registry for both schedules that move over a run: the learning rate (`scheduler.name`, scaled
by the curve after warmup, mlm/optim.py) and the mask rate (`masking.schedule`, which travels
1 - curve of the way to its final rate, mlm/masking.py). So `linear` and `cosine` mean the same
shape in both config groups. A leaf module: it imports nothing from mlm.

Warmup-stable-decay (`scheduler.name=wsd`) has its own parts below: where warmup ends and the decay
starts, in steps, and the curve after warmup. The learning-rate schedule (mlm/optim.py) and the resume rule of
the decay's settings both use them: `decay_branch` lets a stable-phase checkpoint start a decay of another length
(mlm/config.py puts it on those settings; mlm/rundir.py asks it, and refuses a `rate_jump`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

SCHEDULES: Dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress: 1.0,
}

# wsd's decay: progress through the decay (0 -> 1) -> multiplier (1 -> 0). 1-sqrt falls fast, then flattens (Hagele
# et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
DECAY_SHAPES: Dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
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


# ---------------------------------------------------------------- a wsd run's decay branch, read from flat settings

WSD_KEYS = ("trainer.max_steps", "scheduler.decay_ratio", "scheduler.decay_shape")  # what places a wsd decay


def in_stable_phase(flat: dict, step: int) -> bool:
    """Whether a wsd run of these flat settings is at its peak after `step` steps: warmup done, decay not begun
    (computed as the scheduler does). A run counted in epochs or under a time budget is not: its decay's start
    depends on the data's size or on the clock."""
    try:
        total = int(flat["trainer.max_steps"])
        if flat["scheduler.name"] != "wsd" or total <= 0 or flat.get("trainer.budget_minutes"):
            return False
        warmup = warmup_length(int(flat["scheduler.warmup_steps"]), float(flat["scheduler.warmup_ratio"]), total)
        return warmup <= step <= decay_start(total, float(flat["scheduler.decay_ratio"]))
    except (KeyError, TypeError, ValueError):  # settings read from a file that are not a wsd run's: no peak
        return False


def decay_branch(saved: dict, now: dict, step: Optional[int]) -> bool:
    """The resume rule of the wsd decay's settings (mlm.config): a checkpoint in the stable phase of both its schedule
    (`saved`) and this one (`now`) may change the decay: it trained at the peak under both, so a decay branch from it
    follows the new schedule from its next step on. Any other checkpoint (warming up, decaying, not wsd), and a finished
    run (`step` None): no."""
    return step is not None and in_stable_phase(saved, step) and in_stable_phase(now, step)


def rate_after(flat: dict, step: int) -> Optional[float]:
    """The wsd multiplier of the peak after `step` (the rate of step + 1) once warmup is done, as the scheduler computes
    it; None for another schedule, or one whose decay the data's size or the clock places."""
    try:
        total = int(flat["trainer.max_steps"])
        if flat["scheduler.name"] != "wsd" or total <= 0 or flat.get("trainer.budget_minutes"):
            return None
        start = decay_start(total, float(flat["scheduler.decay_ratio"]))
        return stable_then_decay(step, start, total, str(flat["scheduler.decay_shape"]))
    except (KeyError, TypeError, ValueError):  # settings read from a file that are not a wsd run's
        return None


def rate_jump(saved: dict, now: dict, step: int) -> Optional[Tuple[float, float]]:
    """(the rate after `step` under `saved`, under `now`) when a wsd checkpoint already in its decay would train its next
    step at a higher rate under `now` (a longer run, a later decay), jumping the rate back up; else None."""
    before, after = rate_after(saved, step), rate_after(now, step)
    if before is None or after is None or after <= before + 1e-9:
        return None
    if step <= decay_start(int(saved["trainer.max_steps"]), float(saved["scheduler.decay_ratio"])):
        return None  # still at the peak: a decay branch (decay_branch), not a jump
    return before, after
