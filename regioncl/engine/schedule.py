"""The per-step learning rate: linear warmup, then cosine to 0.

(EMA momentum schedules live with the EMA code, in ``regioncl.models.momentum``.)
"""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The LR for 0-based ``step``.

    warmup:  lr = base_lr * (step + 1) / warmup_steps                        for step < warmup_steps
    cosine:  lr = base_lr * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))

