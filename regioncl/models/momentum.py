"""Momentum (EMA) target encoders, their momentum schedule, and feature queues, shared by MoCo,
BYOL, SoCo, DetCo, ... (a method gets all of it here, never from the engine).

The queue is a registered buffer, so it rides in the method's state dict and is checkpointed
and resumed with the weights.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` that starts equal to it and is updated only by ``ema_update_``."""
    target = copy.deepcopy(online)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_online, for every parameter.

    Buffers (BN running statistics) are not averaged: the target keeps its own, as in MoCo and BYOL.
    """
    for target_param, online_param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.mul_(momentum).add_(online_param.detach(), alpha=1 - momentum)


def cosine_momentum(step: int, *, base_momentum: float, total_steps: int) -> float:
    """BYOL's target momentum: m = 1 - (1 - base_momentum) * (cos(pi * step / total_steps) + 1) / 2, rising to 1."""
    return 1 - (1 - base_momentum) * (math.cos(math.pi * step / total_steps) + 1) / 2


class FeatureQueue(nn.Module):
    """A FIFO of L2-normalized features: ``features`` (size, dim), oldest overwritten first."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue_size: expected >= 1, got {size}")
        initial = torch.randn(size, dim, generator=generator)
        self.register_buffer("features", nn.functional.normalize(initial, dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write (N, dim) keys at the pointer, wrapping around the end."""
        size = self.features.shape[0]
        if keys.shape[0] > size:
            raise ValueError(f"queue: cannot enqueue {keys.shape[0]} keys into a queue of size {size}")
        start = int(self.pointer)
        rows = (torch.arange(keys.shape[0], device=keys.device) + start) % size
        self.features[rows] = keys.detach().to(self.features.dtype)
        self.pointer.fill_((start + keys.shape[0]) % size)
