"""Normalization layers by name, for the FPN and box head (``norm: none | bn | gn``).

``bn`` is plain BatchNorm2d: a run with ``sync_bn: true`` synchronizes it across ranks with every
other BN of the method (SoCo's SyncBN FPN and head are ``bn`` + ``sync_bn``), so there is no
separate ``syncbn`` name. ``gn`` is GroupNorm with 32 groups, as in detectron2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

Norm = Literal["none", "bn", "gn"]
NORMS: tuple[str, ...] = ("none", "bn", "gn")
GROUPS = 32


def _group_norm(channels: int) -> nn.GroupNorm:
    if channels % GROUPS:
        raise ValueError(f"norm 'gn': {channels} channels are not divisible into {GROUPS} groups")
    return nn.GroupNorm(GROUPS, channels)


def norm_layer(norm: str) -> Callable[[int], nn.Module] | None:
    """channels -> norm module, or None for ``none`` (torchvision's ``norm_layer`` argument)."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {list(NORMS)}, got {norm!r}")
    return {"none": None, "bn": nn.BatchNorm2d, "gn": _group_norm}[norm]
