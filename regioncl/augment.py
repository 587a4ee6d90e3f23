"""Photometric augmentations (the MoCo v2 / BYOL recipes), with every random draw from a given rng.

Geometry (crop, resize, flip) lives in ``regioncl.geometry``; this module changes pixel values
only. Drawing from an explicit ``numpy.random.Generator`` (seeded per sample by the engine)
instead of the global RNGs makes the augmentations independent of DataLoader workers, which
exact resume and 1-vs-N-process equivalence rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageFilter

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


def _color_jitter(image: Image.Image, recipe: PhotometricRecipe, rng: np.random.Generator) -> Image.Image:
    adjustments = [
        (F.adjust_brightness, rng.uniform(max(0.0, 1 - recipe.brightness), 1 + recipe.brightness)),
        (F.adjust_contrast, rng.uniform(max(0.0, 1 - recipe.contrast), 1 + recipe.contrast)),
        (F.adjust_saturation, rng.uniform(max(0.0, 1 - recipe.saturation), 1 + recipe.saturation)),
        (F.adjust_hue, rng.uniform(-recipe.hue, recipe.hue)),
    ]
    for index in rng.permutation(len(adjustments)):
        adjust, factor = adjustments[index]
        image = adjust(image, float(factor))
    return image


def apply_photometric(image: Image.Image, recipe: PhotometricRecipe, rng: np.random.Generator) -> Image.Image:
    """Apply ``recipe`` to an RGB view; all randomness comes from ``rng``."""
    if rng.random() < recipe.jitter_probability:
        image = _color_jitter(image, recipe, rng)
    if rng.random() < recipe.grayscale_probability:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < recipe.blur_probability:
        sigma = rng.uniform(*recipe.blur_sigma) * max(image.size) / PAPER_VIEW_SIZE
        image = image.filter(ImageFilter.GaussianBlur(radius=float(sigma)))
    if rng.random() < recipe.solarize_probability:
        image = F.solarize(image, threshold=128)
    return image


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, ImageNet-normalized."""
    tensor = F.to_dtype(F.to_image(image), torch.float32, scale=True)
    return F.normalize(tensor, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


# BYOL (Grill et al. 2020, table 6): asymmetric blur and solarization, weaker saturation jitter.
# SoCo uses the same pair (its spec, sec. 2.3): the first for V1, the second for V2-V4.
BYOL_RECIPES = (
    PhotometricRecipe(saturation=0.2, blur_probability=1.0, solarize_probability=0.0),
    PhotometricRecipe(saturation=0.2, blur_probability=0.1, solarize_probability=0.2),
)
