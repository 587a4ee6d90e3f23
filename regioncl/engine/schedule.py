"""The per-step learning rate: linear warmup, then cosine decay.

The defaults (a warmup reaching ``base_lr`` at its last step, a cosine to 0, a new lr every
step) are what the papers state. The released codes differ in details the papers leave open,
and ``PretrainSettings`` exposes them: SoCo's code warms up from ``lr / 100`` and decays to a
floor of 1e-6 (``warmup_start_factor``, ``final_lr``); MoCo's code, and ReSim's and PLRC's
built on it, set the lr once per epoch (``lr_update: epoch``).

(EMA momentum schedules live with the EMA code, in ``regioncl.models.momentum``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_cosine_lr(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    warmup_start_factor: float | None = None,
    final_lr: float = 0.0,
) -> float:
    """The LR for 0-based ``step``.

    warmup (step < W):  lr = base_lr * (step + 1) / W                  warmup_start_factor None
                        lr = base_lr * (s + (1 - s) * step / W)        warmup_start_factor s
    cosine:             lr = final_lr + (base_lr - final_lr) * (1 + cos(pi * (step - W) / (T - W))) / 2

    The second warmup form is the "gradual warmup" of Goyal et al. as SoCo's code runs it: ``s``
    of the lr at step 0, ``base_lr`` reached at step W, where the cosine starts.
    """
    if step < warmup_steps:
        if warmup_start_factor is None:
            return base_lr * (step + 1) / warmup_steps
        return base_lr * (warmup_start_factor + (1 - warmup_start_factor) * step / warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LrSchedule:
    """A run's lr at every step: ``warmup_cosine_lr`` with the run's settings, evaluated at each
    step or (``per_epoch``) at the first step of each epoch, held for the epoch."""

    base_lr: float
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int
    warmup_start_factor: float | None = None
    final_lr: float = 0.0
    per_epoch: bool = False

    def __call__(self, step: int) -> float:
        if self.per_epoch:
            step -= step % self.steps_per_epoch
        return warmup_cosine_lr(
            step,
            base_lr=self.base_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            warmup_start_factor=self.warmup_start_factor,
            final_lr=self.final_lr,
        )
