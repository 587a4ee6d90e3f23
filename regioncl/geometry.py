"""Views as transforms of a source image, and mapping boxes and points between views.

A *view* is what a method feeds its encoder: a crop of the source image (a box in source
pixels, continuous coordinates, x1y1x2y2), resized to an output size, optionally flipped
left-right. Every coordinate in regioncl names the image it lives in; this module is the one
place that moves boxes and points from one frame to another:

    source -> view:  x_v = (x_s - crop_x1) * out_w / crop_w   (then x_v := out_w - x_v if flip)
                     y_v = (y_s - crop_y1) * out_h / crop_h

The source image itself is ``View.identity(width, height)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class View:
    """A crop of the source (x1, y1, x2, y2 source px) resized to ``out_w`` x ``out_h``, maybe flipped."""

    crop: tuple[float, float, float, float]
    out_w: int
    out_h: int
    flip: bool = False

    @classmethod
    def identity(cls, width: int, height: int) -> View:
        return cls(crop=(0.0, 0.0, float(width), float(height)), out_w=width, out_h=height)

    @property
    def scale_x(self) -> float:
        """View px per source px along x."""
        return self.out_w / (self.crop[2] - self.crop[0])

    @property
    def scale_y(self) -> float:
        return self.out_h / (self.crop[3] - self.crop[1])


def _points_to_source(points: np.ndarray, view: View) -> np.ndarray:
    """(N, 2) x,y in ``view`` px -> (N, 2) x,y in source px."""
    x, y = points[:, 0], points[:, 1]
    if view.flip:
        x = view.out_w - x
    return np.stack([x / view.scale_x + view.crop[0], y / view.scale_y + view.crop[1]], axis=1)


def _points_from_source(points: np.ndarray, view: View) -> np.ndarray:
    """(N, 2) x,y in source px -> (N, 2) x,y in ``view`` px."""
    x = (points[:, 0] - view.crop[0]) * view.scale_x
    y = (points[:, 1] - view.crop[1]) * view.scale_y
    if view.flip:
        x = view.out_w - x
    return np.stack([x, y], axis=1)


def map_points(points: np.ndarray, from_view: View, to_view: View) -> np.ndarray:
    """(N, 2) x,y in ``from_view`` px -> (N, 2) x,y in ``to_view`` px (float64)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return _points_from_source(_points_to_source(points, from_view), to_view)


def map_boxes(boxes: np.ndarray, from_view: View, to_view: View) -> np.ndarray:
    """(K, 4) x1y1x2y2 in ``from_view`` px -> (K, 4) x1y1x2y2 in ``to_view`` px (float64).

    Not clipped: a box may extend past the target view (see ``clip_boxes``). A flip between the
    two frames swaps the x corners so that x1 <= x2 still holds.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = map_points(boxes.reshape(-1, 2), from_view, to_view).reshape(-1, 4)
    x1 = np.minimum(corners[:, 0], corners[:, 2])
    x2 = np.maximum(corners[:, 0], corners[:, 2])
    return np.stack([x1, corners[:, 1], x2, corners[:, 3]], axis=1)


def clip_boxes(boxes: np.ndarray, view: View, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Clip (K, 4) view-px boxes to the view; returns (clipped (K, 4), valid (K,) bool).

    A box is invalid when less than ``min_size`` view px of it is left on either axis, e.g. a
    proposal that lies outside the crop.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], 0, view.out_w),
            np.clip(boxes[:, 1], 0, view.out_h),
            np.clip(boxes[:, 2], 0, view.out_w),
            np.clip(boxes[:, 3], 0, view.out_h),
        ],
        axis=1,
    )
    valid = (clipped[:, 2] - clipped[:, 0] >= min_size) & (clipped[:, 3] - clipped[:, 1] >= min_size)
    return clipped, valid


def random_resized_crop(
    width: int,
    height: int,
    out_size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
) -> View:
    """torchvision's RandomResizedCrop parameter sampling (10 tries, then a centre crop), drawn from ``rng``.

    ``out_size`` is an int (square) or (out_w, out_h). Crops are whole source pixels, as in
    torchvision, so rendering needs no sub-pixel resampling offset.
    """
    out_w, out_h = (out_size, out_size) if isinstance(out_size, int) else out_size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    crop: tuple[float, float, float, float] | None = None
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x1 = int(rng.integers(0, width - w + 1))
            y1 = int(rng.integers(0, height - h + 1))
            crop = (float(x1), float(y1), float(x1 + w), float(y1 + h))
            break
    if crop is None:
        crop = _center_crop_within_ratio(width, height, ratio)
    flip = bool(rng.random() < flip_probability)
    return View(crop=crop, out_w=out_w, out_h=out_h, flip=flip)


def _center_crop_within_ratio(width: int, height: int, ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """torchvision's fallback: the whole image, narrowed to the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x1, y1 = (width - w) // 2, (height - h) // 2
    return (float(x1), float(y1), float(x1 + w), float(y1 + h))


def render_view(image: Image.Image, view: View) -> Image.Image:
    """Cut ``view`` out of the source ``image`` (bilinear resize, then the flip)."""
    out = image.resize((view.out_w, view.out_h), resample=Image.Resampling.BILINEAR, box=view.crop)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else out
