"""Region features from feature maps: FPN level assignment, per-level RoIAlign, exact integral pooling.

Boxes arrive as the engine collates them: (B, K, 4) x1y1x2y2 in the pixels of the view the
feature maps were computed from (padded rows carry a mask the loss applies; they must only be
finite here, and zero boxes are). A map named ``"p{l}"`` or ``"c{l}"`` has stride 2^l view px
(ResNet stages and FPN levels). Continuous coordinates: pixel i covers [i, i+1), and feature
cell j of a stride-s map is centred at (j + 0.5) s (``aligned=True``, detectron2's and SoCo's
RoIAlign).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torchvision.ops import roi_align

CANONICAL_SIZE = 224.0  # FPN eq. 1: a box of sqrt(wh) = 224 px in a 224-px view goes to P4
CANONICAL_LEVEL = 4


def assign_levels(
    boxes: torch.Tensor,
    levels: Sequence[int],
    *,
    canonical_size: float = CANONICAL_SIZE,
    canonical_level: int = CANONICAL_LEVEL,
    rounding: Literal["floor", "ceil"] = "floor",
) -> torch.Tensor:
    """(..., 4) view-px boxes -> (...,) int64 pyramid level, clamped to [min(levels), max(levels)].

        k = floor(k0 + log2(sqrt(w h) / canonical_size))          (FPN paper eq. 1; "ceil": ceil)

    ``canonical_size`` is in view px and scales with the method's view size: the papers' values
    are for 224-px views, so a method whose reference view is S px passes ``value * S / 224``.
    Scale it by the method's *reference* view (SoCo: V2), never by each view's own size: SoCo's
    V3 (V2 at half size) must see its boxes land one level lower. SoCo's released thresholds
    (sqrt(wh) <= 48 -> P2, <= 96 -> P3, <= 192 -> P4, else P5) are ``canonical_size=192,
    rounding="ceil"``; detectron2/torchvision use floor with 224.
    """
    widths = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    heights = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    exact = canonical_level + torch.log2(torch.sqrt(widths * heights) / canonical_size)  # -inf for an empty box
    level = torch.floor(exact) if rounding == "floor" else torch.ceil(exact)
    return level.clamp(min(levels), max(levels)).to(torch.int64)


def _level(name: str) -> int:
    """"p4" / "c4" -> 4 (the map's stride is 2^4 view px)."""
    if len(name) < 2 or name[0] not in "pc" or not name[1:].isdigit():
        raise ValueError(f"roi: feature map name {name!r} is not 'p<level>' or 'c<level>' (stride 2^level)")
    return int(name[1:])


def _exact_dtype(feature: torch.Tensor) -> torch.dtype:
    """float64 for a float64 map, else float32: box coordinates (and PrRoIPool's weights) never go
    below float32, even when autocast computes the map in bf16/fp16 (bf16 has ~1 px resolution at 224)."""
    return torch.float64 if feature.dtype == torch.float64 else torch.float32


def _rois(boxes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, K, 4) -> (B * K, 5) rows [image index, x1, y1, x2, y2], torchvision's RoI format."""
    batch, count = boxes.shape[:2]
    index = torch.arange(batch, device=boxes.device, dtype=dtype).repeat_interleave(count)
    return torch.cat([index[:, None], boxes.reshape(-1, 4).to(dtype)], dim=1)


def roi_align_boxes(
    feature: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int,
    stride: int,
    *,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> torch.Tensor:
    """RoIAlign of every box on one map: (B, C, H, W) + (B, K, 4) view px -> (B, K, C, S, S).

    ``sampling_ratio`` <= 0: adaptive (ceil(box / bin) samples per bin), as detectron2 and SoCo.
    """
    batch, count = boxes.shape[:2]
    rois = _rois(boxes, _exact_dtype(feature))
    pooled = roi_align(feature, rois, output_size, 1.0 / stride, sampling_ratio=sampling_ratio, aligned=aligned)
    return pooled.view(batch, count, *pooled.shape[1:])


def multilevel_roi_align(
    features: Mapping[str, torch.Tensor],
    boxes: torch.Tensor,
    levels: torch.Tensor,
    output_size: int,
    *,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> torch.Tensor:
    """Each box RoIAligned on its own level: {"p2": (B, C, H/4, W/4), ...} + (B, K, 4) view px
    + (B, K) levels (every value a level of ``features``) -> (B, K, C, S, S), in the boxes' order.

    Every level is pooled, with no box if none is assigned to it, so every level's parameters
    stay in the autograd graph (zero gradients) and DDP sees them used.
    """
    batch, count = boxes.shape[:2]
    rois = _rois(boxes, _exact_dtype(next(iter(features.values()))))
    flat_levels = levels.reshape(-1)
    pooled: torch.Tensor | None = None
    for name, feature in features.items():
        level = _level(name)
        index = torch.nonzero(flat_levels == level).squeeze(1)  # (n,) rows on this level
        on_level = roi_align(
            feature, rois[index], output_size, 0.5**level, sampling_ratio=sampling_ratio, aligned=aligned
        )  # (n, C, S, S)
        if pooled is None:
            pooled = on_level.new_zeros((batch * count, *on_level.shape[1:]))
        pooled = pooled.index_copy(0, index, on_level)
    if pooled is None:
        raise ValueError("multilevel_roi_align: no feature maps given")
    return pooled.view(batch, count, *pooled.shape[1:])


def _tent_integral(t: torch.Tensor) -> torch.Tensor:
    """Integral of the bilinear kernel k(s) = max(0, 1 - |s|) from -inf to t."""
    return torch.where(t < 0, 0.5 * (t + 1).clamp(min=0) ** 2, 1 - 0.5 * (1 - t).clamp(min=0) ** 2)


def _axis_weights(low: torch.Tensor, high: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K) interval ends in feature cells -> (B, K, size): integral of cell j's kernel over [low, high]."""
    cells = torch.arange(size, device=low.device, dtype=low.dtype)
    return _tent_integral(high[..., None] - cells) - _tent_integral(low[..., None] - cells)


def precise_roi_pool(feature: torch.Tensor, boxes: torch.Tensor, stride: int, *, aligned: bool = True) -> torch.Tensor:
    """Exact 1x1 PrRoIPool (Jiang et al. 2018; ReSim's region features): (B, C, H, W) + (B, K, 4) view px -> (B, K, C).

    The map is a continuous function by bilinear interpolation, f(u, v) = sum_ij F[i, j] k(u - j) k(v - i)
    with k the tent max(0, 1 - |s|) (zero outside the map, as PrRoIPool), and each box's feature
    is its exact mean over the box:

        out = (1 / |box|) * integral_box f = sum_ij F[i, j] Ky[i] Kx[j] / ((u2 - u1)(v2 - v1)),
        Kx[j] = T(u2 - j) - T(u1 - j),   T(t) = integral_{-inf}^{t} k

    with box ends in feature cells u = x / stride - 0.5 (``aligned=True``: cell centres, as
    RoIAlign here; ``False``: u = x / stride, the released PrRoIPool's convention). An empty box
    gives 0. Differentiable in the features (and in the box coordinates). Computed in float32
    (float64 for a float64 map) also under autocast: the result is float32 then.
    """
    dtype = _exact_dtype(feature)
    with torch.autocast(feature.device.type, enabled=False):
        feature = feature.to(dtype)
        offset = 0.5 if aligned else 0.0
        scaled = boxes.to(dtype) / stride - offset  # (B, K, 4) in feature cells
        u1, v1, u2, v2 = scaled.unbind(-1)  # (B, K) each
        height, width = feature.shape[-2:]
        weights_x = _axis_weights(u1, u2, width)  # (B, K, W)
        weights_y = _axis_weights(v1, v2, height)  # (B, K, H)
        along_x = feature @ weights_x.transpose(1, 2)[:, None]  # (B, C, H, W) @ (B, 1, W, K) -> (B, C, H, K)
        integral = (along_x * weights_y.transpose(1, 2)[:, None]).sum(dim=2)  # (B, C, K)
        area = ((u2 - u1) * (v2 - v1)).clamp(min=torch.finfo(dtype).tiny)  # (B, K)
        return integral.transpose(1, 2) / area[..., None]  # (B, K, C)
