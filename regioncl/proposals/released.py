"""SoCo's released selective search: the PyPI package ``selectivesearch`` 0.4 with SoCo's change.

SoCo made its ImageNet proposals (spec_soco §2.1 [C]) with a copy of AlpacaDB's pure-Python
selective search: a Felzenszwalb segmentation of the RGB image (scale 300, sigma 0.9,
min_size 100, full resolution), then greedy merging of the most similar pair of neighbouring
regions (neighbours: overlapping bounding boxes), similarity = colour histogram (HSV) +
texture histogram (LBP, 8 points, radius 1) + size + fill. SoCo's copy differs from the
package in one line: the texture histogram spans LBP codes 0-255, not 0-1 (with 0-1 only codes 0
and 1 are counted). Here the package itself runs, with that one function replaced during the
call; nothing of it is copied.

Optional extra: ``pip install 'regioncl[soco-proposals]'`` (``selectivesearch==0.4``). It costs
about 1 CPU s per ImageNet-size image (500 px) on one core, several seconds for larger photos
(docs/proposals.md).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from unittest import mock

import numpy as np

INSTALL_HINT = "pip install 'regioncl[soco-proposals]'  (installs selectivesearch==0.4)"
PACKAGE_VERSION = "0.4"
TEXTURE_BINS = 10
TEXTURE_RANGE = (0.0, 255.0)  # SoCo's change; the package has (0.0, 1.0)


def soco_texture_histogram(codes: np.ndarray) -> np.ndarray:
    """(N, 3) LBP codes of a region's pixels -> (30,) histogram, 10 bins per channel over
    0-255, divided by N (SoCo's ``_calc_texture_hist``)."""
    histograms = [np.histogram(codes[:, channel], TEXTURE_BINS, TEXTURE_RANGE)[0] for channel in range(3)]
    return np.concatenate(histograms) / len(codes)


def released_rects(image_rgb: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    """Regions of an ``(H, W, 3)`` uint8 RGB image as SoCo's code found them: ``(K, 4)`` int64
    ``x, y, w, h`` where the region spans pixel columns ``x .. x+w-1`` and rows ``y .. y+h-1``.

    In the package's order (initial segments, then each merge) and with its duplicates. Its own
    ``rect`` has ``w = max_x - min_x`` (one less than the columns spanned); it is widened by one
    here so that every mode returns the same kind of rect.
    """
    try:
        version = importlib.metadata.version("selectivesearch")
        from selectivesearch import selectivesearch as package
    except (ImportError, importlib.metadata.PackageNotFoundError) as err:
        raise ImportError(
            f"proposals.selective_search.mode 'soco_released' needs the selectivesearch package: {INSTALL_HINT}"
        ) from err
    if version != PACKAGE_VERSION:
        raise ImportError(
            f"proposals.selective_search.mode 'soco_released' reproduces selectivesearch {PACKAGE_VERSION}, "
            f"found {version}: {INSTALL_HINT}"
        )
    with mock.patch.object(package, "_calc_texture_hist", soco_texture_histogram), warnings.catch_warnings():
        # The package feeds LBP a float image, as SoCo's copy did; scikit-image warns about it.
        warnings.filterwarnings("ignore", message="Applying `local_binary_pattern` to floating-point")
        _, regions = package.selective_search(image_rgb, scale=scale, sigma=sigma, min_size=min_size)
    rects = np.array([region["rect"] for region in regions], dtype=np.int64).reshape(-1, 4)
    rects[:, 2:] += 1
    return rects
