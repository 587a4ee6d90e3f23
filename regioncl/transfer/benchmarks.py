"""Transfer benchmark definitions: what to finetune, on which data, with which solver.

A benchmark is one ``BenchmarkSettings``, built once from a plain dict (the workflow config's
``benchmarks.<name>`` entry resolved by ``resolve_benchmark``). Inner code gets typed values.

The defaults are the papers' COCO protocol (MoCo / SoCo / DetCo ... all follow it): Mask or
Faster R-CNN, R50-FPN, SyncBN finetuned in all stages, 1x schedule (90k iterations, batch 16,
lr 0.02, decays at 60k and 80k, 1000 linear warm-up iterations from 0.001), multi-scale training
(shorter side 640-800, longer side <= 1333), test at 800, torchvision's standard head sizes
(FPN 256 channels, 1024-d box head, 256 / 512 sampled anchors / RoIs per image) and ImageNet
pixel statistics. Differences from the papers' detectron2 configs: the norm applies to the
backbone only (the papers also normalise FPN and heads with SyncBN, and use a 4conv1fc box head).

On the CPU a config sets slim heads (e.g. ``heads: {fpn_channels: 64, box_head_dim: 256,
roi_batch_size_per_image: 128}``): the same code path, smaller numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regioncl.data.layouts import DatasetSpec
from regioncl.settings import Settings

BACKENDS = ("torchvision",)
MODEL_FAMILIES = ("faster_rcnn", "mask_rcnn")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("bn", "frozen_bn", "syncbn")
OPTIMIZERS = ("sgd",)

# Where each dataset layout keeps its detection splits (relative to the dataset root).
SPLIT_PATHS: dict[str, dict[str, str]] = {
    "embedded": {
        "train_json": "annotations/instances_train.json",
        "train_images": "train",
        "val_json": "annotations/instances_val.json",
        "val_images": "val",
    },
    "coco": {
        "train_json": "annotations/instances_train2017.json",
        "train_images": "train2017",
        "val_json": "annotations/instances_val2017.json",
        "val_images": "val2017",
    },
}


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")


def _check_positive(where: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{where}: must be > 0, got {value!r}")


@dataclass(frozen=True)
class DatasetPaths(Settings):
    """A COCO-format detection dataset; relative paths are relative to ``root``."""

    root: str
    train_json: str = "annotations/instances_train.json"
    train_images: str = "train"
    val_json: str = "annotations/instances_val.json"
    val_images: str = "val"

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)


@dataclass(frozen=True)
class HeadSettings(Settings):
    """Sizes of the FPN, RPN and RoI heads (torchvision's defaults = the papers' sizes)."""

    fpn_channels: int = 256
    box_head_dim: int = 1024  # TwoMLPHead representation size
    mask_head_channels: int = 256  # the 4 convs of the mask head
    rpn_batch_size_per_image: int = 256  # anchors sampled per image for the RPN loss
    roi_batch_size_per_image: int = 512  # RoIs sampled per image for the box/mask losses
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_positive(f"heads.{f.name}", getattr(self, f.name))


@dataclass(frozen=True)
class InputSettings(Settings):
    """Resize, flip and normalisation (pixel statistics on the 0..1 RGB scale)."""

    # Training picks one shorter-side size per image at random; testing uses the last one.
    min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    hflip_prob: float = 0.5
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if isinstance(self.min_size, int):
            object.__setattr__(self, "min_size", (self.min_size,))
        if not self.min_size or any(s <= 0 for s in self.min_size):
            raise ValueError(f"input.min_size: expected positive sizes, got {self.min_size!r}")
        _check_positive("input.max_size", self.max_size)
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"input.hflip_prob: expected a probability, got {self.hflip_prob!r}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"input.{name}: expected 3 values (RGB), got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SolverSettings(Settings):
    """SGD with linear warm-up and multi-step decay (detectron2's WarmupMultiStepLR)."""

    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # detectron2's default: no decay on norm parameters
    iterations: int = 90_000
    batch_size: int = 16
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: tuple[int, ...] = (60_000, 80_000)
    gamma: float = 0.1
    checkpoint_every: int = 5000  # iterations between resumable checkpoints in the workdir

    def __post_init__(self) -> None:
        _check_choice("solver.optimizer", self.optimizer, OPTIMIZERS)
        for name in ("lr", "iterations", "batch_size", "checkpoint_every", "gamma"):
            _check_positive(f"solver.{name}", getattr(self, name))
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ValueError(f"solver.lr_steps: expected increasing iterations, got {self.lr_steps!r}")


@dataclass(frozen=True)
class EvalSettings(Settings):
    batch_size: int = 1
    score_threshold: float = 0.05
    detections_per_image: int = 100

    def __post_init__(self) -> None:
        _check_positive("eval.batch_size", self.batch_size)
        _check_positive("eval.detections_per_image", self.detections_per_image)


@dataclass(frozen=True)
class BenchmarkSettings(Settings):
    """One transfer benchmark. ``model`` is the detector family; ``norm`` the backbone's norm:
    ``bn`` (trainable BatchNorm), ``syncbn`` (the same, synchronised across processes) or
    ``frozen_bn`` (torchvision's default for ImageNet-supervised weights)."""

    name: str
    dataset: DatasetPaths
    dataset_name: str = ""  # the workflow config's dataset key (for the DAG); "" outside it
    backend: str = "torchvision"
    model: str = "mask_rcnn"
    arch: str = "resnet50"
    fpn: bool = True
    norm: str = "syncbn"
    trainable_layers: int = 5  # ResNet stages finetuned, counted from the top (5 = all + stem)
    heads: HeadSettings = field(default_factory=HeadSettings)
    input: InputSettings = field(default_factory=InputSettings)
    solver: SolverSettings = field(default_factory=SolverSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("model", self.model, MODEL_FAMILIES)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("norm", self.norm, NORMS)
        if not self.fpn:
            raise ValueError("fpn: the torchvision backend builds FPN detectors only; expected true")
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"trainable_layers: expected 0..5, got {self.trainable_layers!r}")
        # Frozen stages with batch statistics would drift while their weights stay fixed
        # (detectron2 freezes their norms too): ask for frozen_bn instead.
        if self.norm != "frozen_bn" and self.trainable_layers < 5:
            raise ValueError(
                f"trainable_layers: {self.trainable_layers} freezes stages, which needs "
                f"norm 'frozen_bn' (got {self.norm!r}); expected 5 with trainable norms"
            )

    @property
    def with_masks(self) -> bool:
        return self.model == "mask_rcnn"

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.with_masks else ("bbox",)


def resolve_benchmark(name: str, entry: dict[str, Any], dataset: DatasetSpec) -> dict[str, Any]:
    """The fully resolved ``BenchmarkSettings.from_dict`` input (defaults filled in) for a
    config entry (without its ``dataset`` key) on a configured dataset, whose layout supplies
    the split paths."""
    if dataset.layout not in SPLIT_PATHS:
        raise ValueError(
            f"benchmarks.{name}.dataset: {dataset.name!r} has layout {dataset.layout!r}, which "
            f"has no detection annotations; expected one of {sorted(SPLIT_PATHS)}"
        )
    paths = {"root": str(dataset.root), **SPLIT_PATHS[dataset.layout]}
    data = {**entry, "name": name, "dataset_name": dataset.name, "dataset": paths}
    return BenchmarkSettings.from_dict(data, f"benchmarks.{name}").to_dict()
