"""SoCo's proposal filter (spec_soco §2.1) and the random-box proposals of its ablation.

The paper keeps a box ``(w, h)`` of a ``W x H`` image when

    1/3 <= w/h <= 3   and   0.3 <= sqrt(w*h) / sqrt(W*H) <= 0.8.

The released code also requires ``w, h >= 32`` px and, for images left with no box, falls back
to ratio-only, then size-only, then the whole image. Both extras are settings here (on by
default, because the released proposals are what the paper's numbers were trained on);
``min_size_px=0, fallback=False`` is the paper's rule alone.

Boxes are ``(K, 4)`` float ``x1, y1, x2, y2`` in pixels of the original image.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from regioncl.settings import Settings

# The rules, strictest first; the fallback chain walks them in this order.
RULES = ("paper", "ratio_only", "size_only", "whole_image")


@dataclass(frozen=True)
class BoxFilterSettings(Settings):
    """Which proposals to keep.

    max_aspect:   keep ``1/max_aspect <= w/h <= max_aspect`` (paper: 3).
    min_rel_size, max_rel_size: keep ``min <= sqrt(wh)/sqrt(WH) <= max`` (paper: 0.3, 0.8).
    min_size_px:  ``w`` and ``h`` at least this many original pixels, in every rule but
                  ``whole_image`` (released code: 32; 0 = paper).
    fallback:     when no box passes, relax to ratio-only, then size-only, then the whole image
                  (released code: True). Without it an image may keep zero boxes.
    max_boxes:    keep at most this many: the first ones after de-duplication, in the order
                  the generator produced them (selective search's ranking, which
                  ``selective_search`` makes deterministic). None keeps all (paper).
    """

    section: ClassVar[str] = "proposals.filter"

    max_aspect: float = 3.0
    min_rel_size: float = 0.3
    max_rel_size: float = 0.8
    min_size_px: float = 32.0
    fallback: bool = True
    max_boxes: int | None = None

    def __post_init__(self) -> None:
        if not self.max_aspect >= 1.0:
            raise ValueError(f"filter.max_aspect must be >= 1, got {self.max_aspect}")
        if not 0.0 <= self.min_rel_size <= self.max_rel_size:
            raise ValueError(
                f"filter.min_rel_size/max_rel_size must satisfy 0 <= min <= max, "
                f"got {self.min_rel_size}, {self.max_rel_size}"
            )
        if not self.min_size_px >= 0.0:
            raise ValueError(f"filter.min_size_px must be >= 0, got {self.min_size_px}")
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ValueError(f"filter.max_boxes must be >= 1 or null, got {self.max_boxes}")



def rule_masks(
    boxes: np.ndarray, width: int, height: int, settings: BoxFilterSettings
) -> dict[str, np.ndarray]:
    """Which of ``boxes`` (K, 4) pass each rule but ``whole_image``: ``{rule: (K,) bool}``."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    positive = (w > 0) & (h > 0)
    # Degenerate boxes give inf/nan here; they are already excluded by ``positive``.
    with np.errstate(all="ignore"):
        ratio = w / h
        rel_size = np.sqrt(w * h) / math.sqrt(width * height)
    size_only = positive & (w >= settings.min_size_px) & (h >= settings.min_size_px)
    ratio_only = size_only & (ratio >= 1.0 / settings.max_aspect) & (ratio <= settings.max_aspect)
    paper = ratio_only & (rel_size >= settings.min_rel_size) & (rel_size <= settings.max_rel_size)
    return {"paper": paper, "ratio_only": ratio_only, "size_only": size_only}


def filter_boxes(
    boxes: np.ndarray, width: int, height: int, settings: BoxFilterSettings
) -> tuple[np.ndarray, str]:
    """Keep the proposals of a ``width x height`` image that pass the strictest rule possible.

    boxes: (K, 4) float x1y1x2y2 original px. Returns ``(kept (M, 4) float64, rule)`` where
    rule is one of ``RULES``; exact duplicates are dropped (first occurrence kept, order
    preserved) and at most ``settings.max_boxes`` are kept.
    """
    boxes = unique_in_order(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    masks = rule_masks(boxes, width, height, settings)
    chain = RULES[:-1] if settings.fallback else RULES[:1]
    for rule in chain:
        kept = boxes[masks[rule]]
        if len(kept):
            return kept[: settings.max_boxes], rule
    if not settings.fallback:
        return boxes[:0], "paper"
    return np.array([[0.0, 0.0, float(width), float(height)]]), "whole_image"


def unique_in_order(boxes: np.ndarray) -> np.ndarray:
    """Rows of ``boxes`` without exact duplicates, each kept at its first position."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def key_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by ``(seed, key)``: the same for an image wherever and whenever it runs."""
    key_hash = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, key_hash]))


def random_boxes(
    key: str, width: int, height: int, count: int, seed: int, settings: BoxFilterSettings
) -> np.ndarray:
    """Up to ``count`` random boxes that the paper rule of ``settings`` keeps (SoCo's ablation).

    Relative size is uniform in ``[min_rel_size, max_rel_size]``, log aspect uniform in
    ``[-log max_aspect, log max_aspect]``, position uniform inside the image; draws that do not
    fit the image or ``min_size_px`` are rejected. Returns (N <= count, 4) float64 x1y1x2y2;
    fewer than ``count`` only when the image leaves almost no room (pass the result through
    ``filter_boxes``, whose fallback then applies).
    """
    rng = key_rng(seed, key)
    image_side = math.sqrt(width * height)
    found: list[np.ndarray] = []
    total = 0
    # Rejection sampling: a few rounds of oversampled draws, bounded so a hopeless image ends.
    for _ in range(8):
        draws = 4 * count
        side = rng.uniform(settings.min_rel_size, settings.max_rel_size, draws) * image_side
        aspect = np.exp(rng.uniform(-math.log(settings.max_aspect), math.log(settings.max_aspect), draws))
        w = side * np.sqrt(aspect)
        h = side / np.sqrt(aspect)
        fits = (w <= width) & (h <= height) & (w >= settings.min_size_px) & (h >= settings.min_size_px)
        x1 = rng.uniform(0.0, 1.0, draws) * (width - w)
        y1 = rng.uniform(0.0, 1.0, draws) * (height - h)
        boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1)[fits]
        found.append(boxes)
        total += len(boxes)
        if total >= count:
            break
    return np.concatenate(found)[:count]
