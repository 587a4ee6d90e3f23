"""Semi-supervised COCO: a deterministic random fraction of a COCO-format training set.

DetCo and DUPR finetune on "randomly sampled" 1% / 5% / 10% of COCO train2017 without saying
whether images or annotations are sampled, or with which seed. We sample *images* (each keeps
all its annotations, so no image has partial labels) with ``numpy.random.default_rng(seed)``:
the same (file, fraction, seed) always gives the same subset, on every machine, and the seed is
a benchmark setting (``subset_seed``) independent of the finetuning seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from regioncl.io import read_json, write_json_atomic


def sample_image_ids(image_ids: list[int], fraction: float, seed: int) -> list[int]:
    """``round(fraction * n)`` (at least 1) ids drawn without replacement, in ascending order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction: expected 0 < f <= 1, got {fraction!r}")
    ordered = sorted(image_ids)
    count = max(1, round(fraction * len(ordered)))
    chosen = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(chosen)]


def coco_subset(instances: dict[str, Any], fraction: float, seed: int) -> dict[str, Any]:
    """The COCO dict restricted to a random image subset (categories and other keys kept)."""
    keep = set(sample_image_ids([image["id"] for image in instances["images"]], fraction, seed))
    return {
        **instances,
        "images": [image for image in instances["images"] if image["id"] in keep],
        "annotations": [a for a in instances["annotations"] if a["image_id"] in keep],
    }


def training_annotations(source: Path, fraction: float, seed: int, workdir: Path) -> Path:
    """``source`` itself for the full set, else its subset written (once) under ``workdir``."""
    if fraction == 1.0:
        return Path(source)
    target = Path(workdir) / f"{Path(source).stem}_subset{fraction:g}_seed{seed}.json"
    if not target.is_file():
        write_json_atomic(target, coco_subset(read_json(source), fraction, seed))
    return target
