"""Views as transforms of a source image, and mapping boxes and points between views.

A *view* is what a method feeds its encoder: a crop of the source image (a box in source
pixels, continuous coordinates, x1y1x2y2), resized to an output size, optionally flipped
left-right. Every coordinate in regioncl names the image it lives in; this module is the one
place that moves boxes and points from one frame to another:

    source -> view:  x_v = (x_s - crop_x1) * out_w / crop_w   (then x_v := out_w - x_v if flip)
                     y_v = (y_s - crop_y1) * out_h / crop_h

The source image itself is ``View.identity(width, height)``. Annotations (boxes, windows,
cells, points) are computed in one frame and moved with ``map_boxes`` / ``map_points``; since
crop-resize-flip is a per-axis affine map, a box maps to a box, and cell i of a grid maps to
cell i of the mapped grid (a flip reverses the columns' x order, never their indices).

Shapes: boxes (K, 4) x1y1x2y2 and points (N, 2) xy, float64, in the pixels of the frame named
by the argument (``view`` px, source px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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

    def resized(self, out_size: int | tuple[int, int]) -> View:
        """The same crop and flip at another output size (int: square, or (out_w, out_h)).

        SoCo's V3 is V2 down-sampled: ``v2.resized(112)``; boxes move between the two by
        ``map_boxes`` like between any views (a pure scale change). ``render_view`` cuts it from
        the source in one antialiased resampling, not by resampling V2's pixels again.
        """
        out_w, out_h = (out_size, out_size) if isinstance(out_size, int) else out_size
        return View(crop=self.crop, out_w=out_w, out_h=out_h, flip=self.flip)

    def subview(self, inner: View) -> View:
        """``inner``, a view cut out of this view's output image (its crop in this view's px), as a view of the source.

        SoCo's V2 is a random crop of V1: ``v1.subview(random_resized_crop(v1.out_w, v1.out_h, 224, rng))``.
        The crop is ``inner.crop`` mapped to source px; the output size is ``inner``'s; it is
        flipped when exactly one of the two is (a crop of a mirrored image, mirrored again, is not).
        """
        x1, y1, x2, y2 = inner.crop
        corners = _points_to_source(np.array([[x1, y1], [x2, y2]], dtype=np.float64), self)  # (2, 2) source px
        left, right = sorted(corners[:, 0])
        return View(crop=(left, corners[0, 1], right, corners[1, 1]), out_w=inner.out_w, out_h=inner.out_h, flip=self.flip != inner.flip)


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


def crop_intersection(a: View, b: View) -> tuple[float, float, float, float] | None:
    """The overlap of two views' crops, x1y1x2y2 source px; None when it has no area (disjoint or touching)."""
    x1, y1 = max(a.crop[0], b.crop[0]), max(a.crop[1], b.crop[1])
    x2, y2 = min(a.crop[2], b.crop[2]), min(a.crop[3], b.crop[3])
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def boxes_inside(boxes: np.ndarray, view: View, *, tolerance: float = 1e-6) -> np.ndarray:
    """(K, 4) ``view``-px boxes -> (K,) bool: the box lies wholly inside the view (edges may touch).

    ``tolerance`` (view px) absorbs the float error of a box mapped from another frame onto an edge.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (
        (boxes[:, 0] >= -tolerance)
        & (boxes[:, 1] >= -tolerance)
        & (boxes[:, 2] <= view.out_w + tolerance)
        & (boxes[:, 3] <= view.out_h + tolerance)
    )


def boxes_overlap(boxes: np.ndarray, view: View) -> np.ndarray:
    """(K, 4) ``view``-px boxes -> (K,) bool: the box shares a positive area with the view."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    overlap_w = np.minimum(boxes[:, 2], view.out_w) - np.maximum(boxes[:, 0], 0.0)
    overlap_h = np.minimum(boxes[:, 3], view.out_h) - np.maximum(boxes[:, 1], 0.0)
    return (overlap_w > 0) & (overlap_h > 0)


def points_inside(points: np.ndarray, view: View, *, tolerance: float = 1e-6) -> np.ndarray:
    """(N, 2) ``view``-px points -> (N,) bool: 0 <= x <= out_w and 0 <= y <= out_h (``tolerance`` view px)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (
        (points[:, 0] >= -tolerance)
        & (points[:, 0] <= view.out_w + tolerance)
        & (points[:, 1] >= -tolerance)
        & (points[:, 1] <= view.out_h + tolerance)
    )


def jitter_boxes(
    boxes: np.ndarray,
    view: View,
    rng: np.random.Generator,
    *,
    ratio: float = 0.1,
    probability: float = 0.5,
    independent: bool = False,
    anchor: Literal["center", "corner"] = "center",
) -> np.ndarray:
    """(K, 4) ``view``-px boxes, each jittered with ``probability``, clipped to ``view`` -> (K, 4) view px.

    With (x, y) the anchor point, w, h the size and r ~ U[-ratio, ratio] (SoCo sec. 3.2):

        x += r_x w,   y += r_y h,   w += r_w w,   h += r_h h

    ``anchor="center"`` and one r for all four (``independent=False``) is the paper;
    ``anchor="corner"`` (x1, y1) with four independent r's is SoCo's released code. The draws
    (K "apply" uniforms, then K x 1 or K x 4 ratios) do not depend on the boxes' values.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    count = boxes.shape[0]
    apply = rng.random(count) < probability  # (K,)
    r = rng.uniform(-ratio, ratio, size=(count, 4 if independent else 1))  # (K, 4) or (K, 1)
    r = np.broadcast_to(r, (count, 4)) * apply[:, None]  # (K, 4): r_x, r_y, r_w, r_h; 0 where not applied
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if anchor == "center":
        x, y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    else:
        x, y = boxes[:, 0], boxes[:, 1]
    x, y = x + r[:, 0] * w, y + r[:, 1] * h
    w, h = w + r[:, 2] * w, h + r[:, 3] * h
    if anchor == "center":
        jittered = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)
    else:
        jittered = np.stack([x, y, x + w, y + h], axis=1)
    return clip_boxes(jittered, view, min_size=0.0)[0]


def sliding_windows(
    region: tuple[float, float, float, float] | np.ndarray,
    size: float | tuple[float, float],
    stride: float | tuple[float, float],
    *,
    tolerance: float = 1e-6,
) -> np.ndarray:
    """Windows of ``size`` px placed every ``stride`` px from the top-left corner of ``region``
    (x1y1x2y2), those that fit inside it -> (N, 4) x1y1x2y2 in the region's frame, row-major
    (y outer, x inner); (0, 4) when the region is smaller than a window.

    ``size`` and ``stride`` are (w, h) or one value for both, in the same px as the region
    (ReSim: 48 / 32 px of a 224-px view on C4). ``tolerance`` lets a window end on the edge
    despite float error.
    """
    x1, y1, x2, y2 = (float(v) for v in region)
    (w, h), (sx, sy) = _pair(size), _pair(stride)

    def starts(low: float, high: float, extent: float, step: float) -> np.ndarray:
        if high - low < extent - tolerance:
            return np.zeros(0)
        return low + step * np.arange(int(math.floor((high - low - extent + tolerance) / step)) + 1)

    xs, ys = starts(x1, x2, w, sx), starts(y1, y2, h, sy)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # (ny, nx) each
    gx, gy = gx.reshape(-1), gy.reshape(-1)
    return np.stack([gx, gy, gx + w, gy + h], axis=1).reshape(-1, 4)


def grid_cells(box: tuple[float, float, float, float] | np.ndarray, rows: int, cols: int | None = None) -> np.ndarray:
    """A ``rows`` x ``cols`` (default square) grid over ``box`` (x1y1x2y2) -> (rows * cols, 4) cells
    x1y1x2y2 in the box's frame; cell ``r * cols + c`` is row r (from the top), column c (from the left).

    Mapped into a view with ``map_boxes``, cell i stays cell i (the same source sub-rectangle) on
    either side of a flip: DUPR's S x S RoI grid over the crops' intersection, PLRC's n x n source
    regions, DetCo's 3 x 3 jigsaw cells of a crop.
    """
    cols = rows if cols is None else cols
    x1, y1, x2, y2 = (float(v) for v in box)
    xs, ys = np.linspace(x1, x2, cols + 1), np.linspace(y1, y2, rows + 1)  # shared edges, exact ends
    gy, gx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    gy, gx = gy.reshape(-1), gx.reshape(-1)
    return np.stack([xs[gx], ys[gy], xs[gx + 1], ys[gy + 1]], axis=1)


def cell_index(
    points: np.ndarray, box: tuple[float, float, float, float] | np.ndarray, rows: int, cols: int | None = None
) -> np.ndarray:
    """(N, 2) points -> (N,) int64: which cell of ``grid_cells(box, rows, cols)`` holds each point, -1 outside the box.

    Points and box share a frame. Cells are half-open [x_c, x_{c+1}) except the last row and column,
    which include the box's far edge.
    """
    cols = rows if cols is None else cols
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x1, y1, x2, y2 = (float(v) for v in box)
    col = np.clip(np.floor((points[:, 0] - x1) * cols / (x2 - x1)), 0, cols - 1).astype(np.int64)
    row = np.clip(np.floor((points[:, 1] - y1) * rows / (y2 - y1)), 0, rows - 1).astype(np.int64)
    inside = (points[:, 0] >= x1) & (points[:, 0] <= x2) & (points[:, 1] >= y1) & (points[:, 1] <= y2)
    return np.where(inside, row * cols + col, -1)


def sample_fixed_k(count: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(k,) int64 indices into ``count`` items: k distinct ones when count >= k; otherwise all
    ``count`` in random order, then k - count duplicates drawn uniformly from them (SoCo's
    padding to K boxes). Raises when count is 0: the caller decides what replaces nothing.
    """
    if count < 1:
        raise ValueError(f"sample_fixed_k: need at least one item to sample {k} from, got {count}")
    if count >= k:
        return rng.choice(count, size=k, replace=False).astype(np.int64)
    return np.concatenate([rng.permutation(count), rng.choice(count, size=k - count)]).astype(np.int64)


def _pair(value: float | tuple[float, float]) -> tuple[float, float]:
    return (float(value), float(value)) if np.isscalar(value) else (float(value[0]), float(value[1]))


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
