"""Schedule curves by name: progress through training (0 -> 1) -> a multiplier (1 -> 0 for the decays).

One registry for both schedules that move over a run: the learning rate (`scheduler.name`, scaled
by the curve after warmup, mlm/optim.py) and the mask rate (`masking.schedule`, which travels
1 - curve of the way to its final rate, mlm/masking.py). So `linear` and `cosine` mean the same
shape in both config groups. A leaf module: it imports nothing from mlm.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

SCHEDULES: Dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress: 1.0,
}
