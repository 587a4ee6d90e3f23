"""Semantic-segmentation splits and training crops for ``model: fcn`` (``regioncl.transfer.semseg``).

A split gives, per index, an image (3, H, W) float in 0..1 RGB and its label map (H, W) int64:
a class id in 0..C-1 per pixel, or ``IGNORE_LABEL``. Two formats (``DatasetPaths.format``):

- ``cityscapes``: ``images`` = ``leftImg8bit/<split>``, ``annotations`` = ``gtFine/<split>``;
  an image ``<city>/<stem>_leftImg8bit.png`` has the labels ``<city>/<stem>_gtFine_labelIds.png``,
  whose 34 label ids map to the 19 train ids of cityscapesscripts' label table here, on load (no
  ``labelTrainIds.png`` to generate first); the other ids are ignored, as in every Cityscapes
  benchmark.
- ``coco``: a COCO instances JSON (the embedded dataset): background is class 0 and category k
  (in order of COCO id) is class k, painted from each annotation's mask in annotation order;
  crowd regions are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from regioncl.transfer.benchmarks import DatasetPaths, InputSettings
from regioncl.transfer.coco_data import CocoDetection

IGNORE_LABEL = 255  # pixels that count neither in the loss nor in the metrics
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"


class SemSegSplit(Protocol):
    class_names: tuple[str, ...]  # class id -> name

    def __len__(self) -> int: ...
    def load_image(self, index: int) -> torch.Tensor: ...  # (3, H, W) float 0..1 RGB
    def load_label(self, index: int) -> torch.Tensor: ...  # (H, W) int64 class ids or IGNORE_LABEL


def read_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)


def cityscapes_train_ids() -> tuple[np.ndarray, tuple[str, ...]]:
    """(a 256-entry lookup table label id -> train id, ``IGNORE_LABEL`` for ids without one;
    the train ids' names) from cityscapesscripts' label table."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Cityscapes semantic segmentation maps label ids to train ids with the 'cityscapesscripts' "
            "package, which is not installed; install it with: pip install cityscapesscripts "
            "(or the extra: pip install 'regioncl[detectron2]')"
        ) from error
    table = np.full(256, IGNORE_LABEL, np.uint8)
    names: dict[int, str] = {}
    for label in labels:  # trainId 255 or -1: not a benchmark class
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_LABEL:
            table[label.id] = label.trainId
            names[label.trainId] = label.name
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"cityscapesscripts' label table: train ids {sorted(names)} are not 0..{len(names) - 1}")
    return table, tuple(names[i] for i in range(len(names)))


class CityscapesSemSeg:
    """The fine annotations of one Cityscapes split, images in sorted path order."""

    def __init__(self, images_dir: Path, labels_dir: Path) -> None:
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        self.train_id_of, self.class_names = cityscapes_train_ids()
        self.images = sorted(self.images_dir.glob(f"*/*{CITYSCAPES_IMAGE_SUFFIX}"))
        if not self.images:
            raise FileNotFoundError(f"{self.images_dir}: no images <city>/*{CITYSCAPES_IMAGE_SUFFIX}")
        self.labels = [self.label_path(image) for image in self.images]
        missing = [str(path) for path in self.labels if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.labels_dir}: {len(missing)} label files missing (expected one "
                f"<city>/*{CITYSCAPES_LABEL_SUFFIX} per image), e.g. {missing[:3]}"
            )

    def label_path(self, image: Path) -> Path:
        stem = image.name.removesuffix(CITYSCAPES_IMAGE_SUFFIX)
        return self.labels_dir / image.parent.name / f"{stem}{CITYSCAPES_LABEL_SUFFIX}"

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> torch.Tensor:
        return read_rgb(self.images[index])

    def load_label(self, index: int) -> torch.Tensor:
        with Image.open(self.labels[index]) as image:
            label_ids = np.asarray(image)
        if label_ids.ndim != 2:
            raise ValueError(f"{self.labels[index]}: expected a single-channel label-id image, got shape {label_ids.shape}")
        return torch.from_numpy(self.train_id_of[label_ids].astype(np.int64))


class CocoSemSeg:
    """A COCO instances split as class maps: 0 background, 1..K the categories by COCO id."""

    def __init__(self, annotation_json: Path, images_dir: Path) -> None:
        self.detection = CocoDetection(annotation_json, images_dir, with_masks=True)
        coco = self.detection.coco
        self.class_names = ("background", *(coco.cats[c]["name"] for c in self.detection.category_ids))

    def __len__(self) -> int:
        return len(self.detection)

    def load_image(self, index: int) -> torch.Tensor:
        return self.detection.load_image(index)

    def load_label(self, index: int) -> torch.Tensor:
        coco, image_id = self.detection.coco, self.detection.image_ids[index]
        info = coco.imgs[image_id]
        label = np.zeros((info["height"], info["width"]), np.int64)
        for annotation in coco.imgToAnns[image_id]:  # later annotations over earlier ones
            painted = IGNORE_LABEL if annotation.get("iscrowd", 0) else self.detection.label_of_category[annotation["category_id"]]
            label[coco.annToMask(annotation) > 0] = painted
        return torch.from_numpy(label)


def semseg_split(dataset: DatasetPaths, split: str) -> SemSegSplit:
    """The ``train`` or ``val`` split of a benchmark's dataset, read as its ``format`` says."""
    annotations, images = dataset.path(f"{split}_json"), dataset.path(f"{split}_images")
    if dataset.format == "cityscapes":
        return CityscapesSemSeg(images, annotations)
    return CocoSemSeg(annotations, images)


def normalise(image: torch.Tensor, size: InputSettings) -> torch.Tensor:
    """(3, H, W) RGB 0..1 -> the same, standardised by the benchmark's pixel statistics."""
    mean = torch.tensor(size.pixel_mean).view(3, 1, 1)
    std = torch.tensor(size.pixel_std).view(3, 1, 1)
    return (image - mean) / std


def training_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    scale: float,
    corner: tuple[float, float],
    flip: bool,
    crop_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample: ``image`` (3, H, W) normalised and ``label`` (H, W) resized by
    ``scale`` (bilinear; nearest for labels), padded to at least ``crop_size`` on each side (image
    0 = the mean pixel, label ``IGNORE_LABEL``), cropped to ``crop_size`` square with its top-left
    corner at fractions ``corner`` = (y, x) in [0, 1) of the free range, and mirrored if ``flip``.
    Returns (3, crop, crop) float and (crop, crop) int64."""
    height, width = image.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    pad_y, pad_x = max(0, crop_size - size[0]), max(0, crop_size - size[1])
    image = F.pad(image, (0, pad_x, 0, pad_y), value=0.0)
    label = F.pad(label, (0, pad_x, 0, pad_y), value=IGNORE_LABEL)
    top = int(corner[0] * (image.shape[-2] - crop_size + 1))
    left = int(corner[1] * (image.shape[-1] - crop_size + 1))
    image = image[:, top : top + crop_size, left : left + crop_size]
    label = label[top : top + crop_size, left : left + crop_size]
    if flip:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()
