"""Photometric augmentations (the MoCo v2 / BYOL recipes), with every random draw from a given rng.

Geometry (crop, resize, flip) lives in ``regioncl.geometry``; this module changes pixel values
only. Drawing from an explicit ``numpy.random.Generator`` (seeded per sample by the engine)
instead of the global RNGs makes the augmentations independent of DataLoader workers, which
exact resume and 1-vs-N-process equivalence rely on.

A view's augmentation is drawn once, as a parameter table (``draw_photometric``: one row of
``PHOTOMETRIC_COLUMNS`` float64 values per view), and rendered by one of two painters:

- ``photometric_pil``: one PIL view in a DataLoader worker (the recipes' reference rendering);
- ``photometric_batch``: a whole (B, 3, H, W) float batch with per-row parameters, vectorised,
  after torchvision's tensor formulas; one code path on the CPU and on CUDA.

Methods build their views with ``augmented_view`` (and ``cut_patches`` for jigsaw sets). What
it returns depends on who asked (``view_output``, set by the engine's loader around each
``make_views`` call):

- ``"normalized"`` (a plain call: tests, benchmarks): the augmented view as (3, H, W) float32,
  ImageNet-normalised, rendered with PIL;
- ``"worker"``: the PIL-augmented view as (3, H, W) uint8;
- ``"device"``: the un-augmented view as (3, H, W) uint8 and its parameter table under
  ``name + PHOTOMETRIC_SUFFIX``.

The training process finishes a batch of uint8 views on its device (``finish_views``): the
device-mode photometric, the float conversion and the normalisation. The draws are the same in
every mode, in the same order, so a sample's geometry (and every box mapped by it) does not
depend on the mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageFilter
from torch.nn import functional as nnf

from regioncl.geometry import View, render_view

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAPER_VIEW_SIZE = 224  # the view size the papers' blur sigmas are given for


@dataclass(frozen=True)
class PhotometricRecipe:
    """Color jitter (random order, as torchvision's ColorJitter), grayscale, blur, solarize."""

    jitter_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px of a 224-px view; scaled to the actual view size
    solarize_probability: float = 0.0


MOCO_V2_RECIPE = PhotometricRecipe()

# BYOL (Grill et al. 2020, table 6): asymmetric blur and solarization, weaker saturation jitter.
# SoCo uses the same pair (its spec, sec. 2.3): the first for V1, the second for V2-V4.
BYOL_RECIPES = (
    PhotometricRecipe(saturation=0.2, blur_probability=1.0, solarize_probability=0.0),
    PhotometricRecipe(saturation=0.2, blur_probability=0.1, solarize_probability=0.2),
)

# -- the parameter table: one row per view, float64 --------------------------------------------
# Jitter factors are indexed by op: BRIGHTNESS + op for op in JITTER_OPS order; ORDER holds the
# ops by position (the random order of ColorJitter). Flags are 0 / 1.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)
GRAYSCALE, BLUR, BLUR_SIGMA, SOLARIZE = 9, 10, 11, 12  # BLUR_SIGMA: view px
PHOTOMETRIC_COLUMNS = 13
PHOTOMETRIC_SUFFIX = "_photometric"  # batch key of a view's (B, PHOTOMETRIC_COLUMNS) table
PATCHES_SUFFIX = "_patches"  # batch key of a view's (B, K, 4) patch boxes, cut after the device photometric
SOLARIZE_THRESHOLD = 128  # of 255

ViewOutput = Literal["normalized", "worker", "device"]
_VIEW_OUTPUT: ContextVar[ViewOutput] = ContextVar("regioncl_view_output", default="normalized")


def draw_photometric(recipe: PhotometricRecipe, rng: np.random.Generator, view_size: tuple[int, int]) -> np.ndarray:
    """Every random parameter of ``recipe`` for one view of ``view_size`` (w, h) px -> (PHOTOMETRIC_COLUMNS,) float64.

    The draws, in order: jitter?, its four factors and their order, grayscale?, blur?, its sigma,
    solarize?. An op not drawn keeps its identity parameters (factor 1, hue 0, order 0-3).
    """
    table = np.zeros(PHOTOMETRIC_COLUMNS)
    table[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    table[ORDER] = np.arange(len(JITTER_OPS))
    if rng.random() < recipe.jitter_probability:
        table[JITTER] = 1.0
        table[BRIGHTNESS] = rng.uniform(max(0.0, 1 - recipe.brightness), 1 + recipe.brightness)
        table[CONTRAST] = rng.uniform(max(0.0, 1 - recipe.contrast), 1 + recipe.contrast)
        table[SATURATION] = rng.uniform(max(0.0, 1 - recipe.saturation), 1 + recipe.saturation)
        table[HUE] = rng.uniform(-recipe.hue, recipe.hue)
        table[ORDER] = rng.permutation(len(JITTER_OPS))
    if rng.random() < recipe.grayscale_probability:
        table[GRAYSCALE] = 1.0
    if rng.random() < recipe.blur_probability:
        table[BLUR] = 1.0
        table[BLUR_SIGMA] = rng.uniform(*recipe.blur_sigma) * max(view_size) / PAPER_VIEW_SIZE
    if rng.random() < recipe.solarize_probability:
        table[SOLARIZE] = 1.0
    return table


_PIL_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def photometric_pil(image: Image.Image, table: np.ndarray) -> Image.Image:
    """Render one view's parameter table on an RGB PIL view (uint8 arithmetic, PIL's blur)."""
    if table[JITTER]:
        for op in table[ORDER].astype(int):
            image = _PIL_JITTER[op](image, float(table[BRIGHTNESS + op]))
    if table[GRAYSCALE]:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if table[BLUR]:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(table[BLUR_SIGMA])))
    if table[SOLARIZE]:
        image = F.solarize(image, threshold=SOLARIZE_THRESHOLD)
    return image


def apply_photometric(image: Image.Image, recipe: PhotometricRecipe, rng: np.random.Generator) -> Image.Image:
    """Apply ``recipe`` to an RGB view; all randomness comes from ``rng``."""
    return photometric_pil(image, draw_photometric(recipe, rng, image.size))


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, ImageNet-normalized."""
    return normalize_views(F.pil_to_tensor(image))


def normalize_views(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 or [0, 1] float -> float32, ImageNet-normalized (elementwise: a batch
    gives bitwise the values its views give one by one; torchvision's ``normalize`` formula, with
    the constants sent to the device asynchronously instead of by a blocking copy)."""
    mean, std = (_to_device(torch.tensor(values).view(3, 1, 1), images.device) for values in (IMAGENET_MEAN, IMAGENET_STD))
    return F.to_dtype(images, torch.float32, scale=True).sub(mean).div_(std)


# -- views as methods build them ----------------------------------------------------------------


@contextmanager
def view_output(mode: ViewOutput) -> Iterator[None]:
    """What ``augmented_view`` returns inside this block (see the module docstring)."""
    token = _VIEW_OUTPUT.set(mode)
    try:
        yield
    finally:
        _VIEW_OUTPUT.reset(token)


def augmented_view(
    name: str, image: Image.Image, view: View, recipe: PhotometricRecipe, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """``view`` cut from the source ``image`` with ``recipe`` drawn from ``rng``: {name: (3, H, W)},
    plus {name + PHOTOMETRIC_SUFFIX: (PHOTOMETRIC_COLUMNS,) float64} in "device" mode."""
    rendered = render_view(image, view)
    table = draw_photometric(recipe, rng, rendered.size)
    mode = _VIEW_OUTPUT.get()
    if mode == "device":
        return {name: F.pil_to_tensor(rendered), name + PHOTOMETRIC_SUFFIX: torch.from_numpy(table)}
    augmented = F.pil_to_tensor(photometric_pil(rendered, table))
    return {name: augmented if mode == "worker" else normalize_views(augmented)}


def cut_patches(views: dict[str, torch.Tensor], name: str, boxes: np.ndarray) -> dict[str, torch.Tensor]:
    """``views[name]`` (3, H, W), an ``augmented_view``, replaced by its patches (K, 3, p, p) at
    ``boxes`` (K, 4) integer x1y1x2y2 view px, all p x p. In "device" mode the whole view stays
    and the boxes go under ``name + PATCHES_SUFFIX``: ``finish_views`` cuts them after the photometric."""
    boxes = np.asarray(boxes).astype(np.int64)
    if name + PHOTOMETRIC_SUFFIX in views:
        return {**views, name + PATCHES_SUFFIX: torch.from_numpy(boxes)}
    whole = views[name]
    return {**views, name: torch.stack([whole[:, y1:y2, x1:x2] for x1, y1, x2, y2 in boxes.tolist()])}


# -- the batched painter ------------------------------------------------------------------------


def _blend(image1: torch.Tensor, image2: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` for floats with a per-row ratio (B, 1, 1, 1)."""
    return image1.mul(ratio).add_((1 - ratio) * image2).clamp_(0, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return F.rgb_to_grayscale(images, num_output_channels=1)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, 0.0, factor)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grayscale(images), factor)


def _hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's hue turn (RGB -> HSV, h += factor mod 1, HSV -> RGB) in closed form: with
    V = max, C = max - min and H6 the hue in sixths, channel n (R 5, G 3, B 1) is
    V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H6) mod 6. No HSV image is built."""
    r, g, b = images.unbind(dim=-3)
    minc, maxc = torch.aminmax(images, dim=-3)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sixths = torch.where(
        maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)
    ).add_(6 * factor[:, 0])  # (B, H, W): the turned hue in sixths, any real
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (sixths + n).remainder_(6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(channels, dim=-3)


_BATCH_JITTER: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    _brightness, _contrast, _saturation, _hue,
)  # fmt: skip


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """torchvision's gaussian_blur with a per-row sigma (B, 1, 1, 1) px and one kernel of
    2 * radius + 1 taps: separable, reflect-padded, one grouped convolution per axis."""
    batch, channels, height, width = images.shape
    radius = min(radius, height - 1, width - 1)  # reflect padding needs a pad below the side
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.view(batch, 1)) ** 2)  # (B, 2r+1)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, 2r+1)
    flat = nnf.pad(images.reshape(1, batch * channels, height, width), [radius] * 4, mode="reflect")
    with torch.autocast(images.device.type, enabled=False):  # the engine finishes views inside its autocast
        flat = nnf.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
        flat = nnf.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    return flat.view(batch, channels, height, width)


def _on_rows(
    images: torch.Tensor, rows: np.ndarray, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], values: torch.Tensor
) -> torch.Tensor:
    """``op(images[rows], values[rows])`` written back into ``images``; ``rows`` (B,) bool on the
    host, so choosing them needs no device->host sync."""
    if not rows.any():
        return images
    if rows.all():
        return op(images, values)
    index = _to_device(torch.from_numpy(np.flatnonzero(rows)), images.device)
    return images.index_copy(0, index, op(images.index_select(0, index), values.index_select(0, index)))


def photometric_batch(images: torch.Tensor, table: torch.Tensor, host_table: np.ndarray) -> torch.Tensor:
    """Render a batch's parameter tables on its views.

    images: (B, 3, H, W) float in [0, 1] on any device; table: (B, PHOTOMETRIC_COLUMNS) on the
    same device; host_table: the same values on the host (they choose the rows of each op).
    Returns (B, 3, H, W) float in [0, 1]. Each op runs once per row that draws it, in the row's
    own jitter order; no device->host sync.
    """
    values = table.to(images.dtype)[:, :, None, None]  # (B, columns, 1, 1): per-row scalars broadcast over pixels
    jitter = host_table[:, JITTER] > 0
    order = host_table[:, ORDER]
    for position in range(len(JITTER_OPS)):
        for op, paint in enumerate(_BATCH_JITTER):
            images = _on_rows(images, jitter & (order[:, position] == op), paint, values[:, BRIGHTNESS + op, None])
    images = _on_rows(images, host_table[:, GRAYSCALE] > 0, lambda x, _: _grayscale(x).expand_as(x), values)
    blur = host_table[:, BLUR] > 0
    if blur.any():
        radius = math.ceil(3 * host_table[blur, BLUR_SIGMA].max())
        images = _on_rows(images, blur, lambda x, v: _gaussian_blur(x, v[:, BLUR_SIGMA], radius), values)
    threshold = SOLARIZE_THRESHOLD / 255
    return _on_rows(images, host_table[:, SOLARIZE] > 0, lambda x, _: F.solarize(x, threshold=threshold), values)


def _cut_patches_batch(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) and (B, K, 4) integer x1y1x2y2 boxes of ``size`` px -> (B, K, 3, size, size)."""
    steps = torch.arange(size, device=images.device)
    rows = (boxes[:, :, 1, None] + steps)[:, :, :, None]  # (B, K, size, 1)
    cols = (boxes[:, :, 0, None] + steps)[:, :, None, :]  # (B, K, 1, size)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 1, 4, 2, 3)


def finish_views(batch: dict[str, Any], host: Mapping[str, Any]) -> dict[str, Any]:
    """A collated batch on its device -> the batch a method's ``forward`` takes.

    Every uint8 (B, [K,] 3, H, W) tensor is a view: its photometric table (device mode) is
    rendered by ``photometric_batch``, its patches cut, and it becomes float32, ImageNet-normalised.
    ``host``: the same batch before its transfer (the tables' host copies). The table and patch
    keys are consumed.
    """
    out = {key: value for key, value in batch.items() if not key.endswith((PHOTOMETRIC_SUFFIX, PATCHES_SUFFIX))}
    for key, value in out.items():
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() >= 4 and value.shape[-3] == 3):
            continue
        images = F.to_dtype(value, torch.float32, scale=True)
        if key + PHOTOMETRIC_SUFFIX in batch:
            host_table = host[key + PHOTOMETRIC_SUFFIX].numpy()
            images = photometric_batch(images, batch[key + PHOTOMETRIC_SUFFIX], host_table)
        if key + PATCHES_SUFFIX in batch:
            first = host[key + PATCHES_SUFFIX][0, 0]
            images = _cut_patches_batch(images, batch[key + PATCHES_SUFFIX], int(first[2] - first[0]))
        out[key] = normalize_views(images)
    return out


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor to ``device`` without waiting for it (pinned first on CUDA)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
