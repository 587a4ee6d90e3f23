"""Selective search (Uijlings et al. 2013) behind a resize policy, boxes in original pixels.

Two implementations:

- OpenCV's ximgproc (``fast``, ``quality``, ``single``): a C++ selective search with its own
  graph segmentation, colour, texture (Gaussian derivatives), size and fill similarities,
  neighbours by pixel adjacency, and a randomized ranking of the output. ``single`` is OpenCV's
  one-strategy mode (HSV, one k); it is not SoCo's algorithm, whatever its k and sigma.
- ``soco_released``: the algorithm that made SoCo's released proposals (spec_soco §2.1 [C]), the
  PyPI package ``selectivesearch`` 0.4 with SoCo's texture-range change (``released.py``,
  optional extra ``soco-proposals``). SoCo's settings: ``SOCO_RELEASED``. About 1 CPU s per
  ImageNet-size image, ~30x the paper default (docs/proposals.md).

Cost grows with the pixel count, so the image may be shrunk before segmenting (``max_side`` /
``min_side``, ``max_scale``); every mode's rects go through the same mapping back to original
pixels.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from regioncl.proposals.released import released_rects
from regioncl.settings import Settings

# OpenCV strategy switches per mode. "single" uses one HSV colour space, one k, and all four
# similarities (colour, texture, size, fill); fast/quality diversify over colour spaces and k.
_SWITCH = {
    "fast": lambda ss, s: ss.switchToSelectiveSearchFast(s.base_k, s.inc_k, s.sigma),
    "quality": lambda ss, s: ss.switchToSelectiveSearchQuality(s.base_k, s.inc_k, s.sigma),
    "single": lambda ss, s: ss.switchToSingleStrategy(s.base_k, s.sigma),
}
RELEASED_MODE = "soco_released"
MODES = (*_SWITCH, RELEASED_MODE)

# OpenCV ranks regions by ``level * rand()`` with the C library's global rand(), so the order
# of the output would depend on how many images the process segmented before. Reseeding it per
# image makes the ranking (and ``max_boxes``) a function of the image alone.
_C_RAND_SEED = 1
_libc = ctypes.CDLL(None)


@dataclass(frozen=True)
class SelectiveSearchSettings(Settings):
    """How to run selective search.

    mode:     "fast" | "quality" | "single" (OpenCV's switchToSelectiveSearchFast/Quality,
              switchToSingleStrategy), or "soco_released" (SoCo's released algorithm, see
              the module docstring).
    max_side: shrink the image so its longer side is at most this (None: no cap).
    min_side: alternatively, shrink so the shorter side is at most this. Images are never
              enlarged: upsampling adds cost and no detail.
    max_scale: also shrink by at least this factor (None: no such cap), e.g. 0.25 with
              ``max_side: 96`` segments a 256 px image at 64 px and a 500 px one at 96 px.
              All None = full resolution.
    base_k, inc_k, sigma: Felzenszwalb parameters of the initial segmentations (OpenCV's
              defaults). "single" uses ``base_k`` as its k and ignores ``inc_k``;
              "soco_released" uses ``base_k`` as its ``scale`` (SoCo: 300, sigma 0.9).
    min_size: smallest initial segment, in segmented px ("soco_released" only; SoCo: 100;
              OpenCV's modes have no such setting).
    """

    section: ClassVar[str] = "proposals.selective_search"

    mode: str = "fast"
    max_side: int | None = None
    min_side: int | None = None
    max_scale: float | None = None
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    min_size: int = 100

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"selective_search.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_side is not None and self.min_side is not None:
            raise ValueError(
                f"selective_search: set max_side ({self.max_side}) or min_side ({self.min_side}), not both"
            )
        for name in ("max_side", "min_side"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ValueError(f"selective_search.{name} must be >= 8 px or null, got {value}")
        if self.max_scale is not None and not 0.0 < self.max_scale <= 1.0:
            raise ValueError(f"selective_search.max_scale must be in (0, 1] or null, got {self.max_scale}")
        if self.base_k < 1 or self.inc_k < 1 or self.min_size < 1 or not self.sigma > 0:
            raise ValueError(
                f"selective_search: base_k, inc_k, min_size must be >= 1 and sigma > 0, "
                f"got {self.base_k}, {self.inc_k}, {self.min_size}, {self.sigma}"
            )


# The settings of SoCo's released proposals: its algorithm at full resolution (spec_soco §2.1 [C]).
SOCO_RELEASED = SelectiveSearchSettings(mode=RELEASED_MODE, base_k=300, sigma=0.9, min_size=100)


def segmentation_size(width: int, height: int, settings: SelectiveSearchSettings) -> tuple[int, int]:
    """``(width, height)`` at which to segment a ``width x height`` image under the resize policy."""
    scale = 1.0
    if settings.max_side is not None:
        scale = min(1.0, settings.max_side / max(width, height))
    elif settings.min_side is not None:
        scale = min(1.0, settings.min_side / min(width, height))
    if settings.max_scale is not None:
        scale = min(scale, settings.max_scale)
    return max(1, round(width * scale)), max(1, round(height * scale))


def rects_to_boxes(rects: np.ndarray, segmented: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """Rects ``(K, 4) x, y, w, h`` (integer px of the segmented image) -> ``(K, 4)``
    float64 ``x1, y1, x2, y2`` in original px.

    A rect covers pixel columns ``x .. x+w-1``, i.e. the continuous interval ``[x, x+w]``;
    each axis scales by ``original / segmented`` (per axis, since rounding the resized size
    changes the aspect slightly).
    """
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    scale_x = original[0] / segmented[0]
    scale_y = original[1] / segmented[1]
    x, y, w, h = rects.T
    boxes = np.stack([x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y], axis=1)
    # Rects never leave the segmented image, but the products above may overshoot by an ulp.
    return np.clip(boxes, 0.0, [original[0], original[1], original[0], original[1]])


def opencv_rects(image_rgb: np.ndarray, settings: SelectiveSearchSettings) -> np.ndarray:
    """OpenCV's selective search: ``(K, 4)`` int rects ``x, y, w, h`` (``w`` columns from
    ``x``) in its ranking order, made deterministic by reseeding ``rand()`` (``_C_RAND_SEED``)."""
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    _SWITCH[settings.mode](search, settings)
    _libc.srand(_C_RAND_SEED)
    return search.process()


def selective_search(image_rgb: np.ndarray, settings: SelectiveSearchSettings) -> np.ndarray:
    """Proposals of an ``(H, W, 3)`` uint8 RGB image: ``(K, 4)`` float64 x1y1x2y2 in its pixels,
    in the implementation's (deterministic) order."""
    height, width = image_rgb.shape[:2]
    seg_w, seg_h = segmentation_size(width, height, settings)
    if (seg_w, seg_h) != (width, height):
        image_rgb = cv2.resize(image_rgb, (seg_w, seg_h), interpolation=cv2.INTER_AREA)
    if settings.mode == RELEASED_MODE:
        rects = released_rects(image_rgb, settings.base_k, settings.sigma, settings.min_size)
    else:
        rects = opencv_rects(image_rgb, settings)
    return rects_to_boxes(rects, (seg_w, seg_h), (width, height))
