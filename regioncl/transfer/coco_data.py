"""A COCO-json detection split as torchvision detection samples.

A sample is ``(image, target)``: ``image`` a float tensor (3, H, W) in 0..1 RGB; ``target``
holds ``boxes`` (N, 4) float x1y1x2y2 in image pixels, ``labels`` (N,) int64 in 1..K
(0 is torchvision's background), ``image_id`` (the COCO id) and, with masks, ``masks``
(N, H, W) uint8. Crowd annotations and boxes without area are left out of training targets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from regioncl.geometry import View, map_boxes
from regioncl.io import read_json

Target = dict[str, torch.Tensor]


def load_coco(annotation_json: Path) -> COCO:
    """pycocotools' index of a COCO json (its progress chatter goes to stderr, not stdout).

    Parsed here, not by pycocotools, so that a broken file is an error naming it."""
    if not Path(annotation_json).is_file():
        raise FileNotFoundError(f"{annotation_json}: COCO annotation file not found")
    dataset = read_json(annotation_json)
    if not isinstance(dataset, dict):
        raise ValueError(f"{annotation_json}: expected a COCO JSON object, got a {type(dataset).__name__}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(sys.stderr):
        coco.createIndex()
    return coco


class CocoDetection:
    """Images of one split with their annotations, in a fixed order (sorted image ids)."""

    def __init__(self, annotation_json: Path, images_dir: Path, with_masks: bool) -> None:
        self.coco = load_coco(annotation_json)
        self.images_dir = Path(images_dir)
        self.with_masks = with_masks
        self.image_ids = sorted(self.coco.getImgIds())
        # Contiguous labels 1..K in order of COCO category id; evaluation maps back.
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of_category = {c: i + 1 for i, c in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, index: int) -> torch.Tensor:
        """(3, H, W) float in 0..1, RGB."""
        info = self.coco.imgs[self.image_ids[index]]
        path = self.images_dir / info["file_name"]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, the annotations say "
                f"{info['width']}x{info['height']}"
            )
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, index: int) -> Target:
        image_id = self.image_ids[index]
        annotations = [
            a
            for a in self.coco.imgToAnns[image_id]
            if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
        labels = [self.label_of_category[a["category_id"]] for a in annotations]
        target = {
            "boxes": boxes,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(image_id),
        }
        if self.with_masks:
            info = self.coco.imgs[image_id]
            masks = [self.coco.annToMask(a) for a in annotations]
            target["masks"] = torch.from_numpy(
                np.stack(masks) if masks else np.zeros((0, info["height"], info["width"]), np.uint8)
            )
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self.load_image(index), self.load_target(index)


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror an image (3, H, W) and its target left-right (boxes via ``regioncl.geometry``)."""
    height, width = image.shape[-2:]
    source = View.identity(width, height)
    mirrored = dataclasses.replace(source, flip=True)
    boxes = map_boxes(target["boxes"].numpy(), source, mirrored)
    flipped = dict(target)
    flipped["boxes"] = torch.from_numpy(boxes).to(target["boxes"].dtype)
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped
