"""Transfer benchmark definitions: what to finetune, on which data, with which solver.

A benchmark is one ``BenchmarkSettings``, built once from a plain dict (the workflow config's
``benchmarks.<name>`` entry resolved by ``resolve_benchmark``). Inner code gets typed values.

The defaults are the papers' COCO protocol (MoCo / SoCo / DetCo ... all follow it): Mask or
Faster R-CNN, R50-FPN, SyncBN finetuned in all stages, 1x schedule (90k iterations, batch 16,
lr 0.02, decays at 60k and 80k, 1000 linear warm-up iterations from 0.001), multi-scale training
(shorter side 640-800, longer side <= 1333), test at 800, torchvision's standard head sizes
(FPN 256 channels, 1024-d box head, 256 / 512 sampled anchors / RoIs per image) and ImageNet
pixel statistics.

The papers' own protocols (``config/benchmarks/*.yaml``, loaded by ``regioncl.transfer.registry``)
run on the detectron2 backend, which also builds R50-C4 detectors (``fpn: false``), RetinaNet,
norms in the FPN and heads (``fpn_norm``, ``head_norm``), SoCo's 4conv1fc box head, MoCo's extra
norm after res5 (``res5_extra_norm``), precise BN and LVIS's repeat-factor sampler. The
torchvision backend builds FPN Faster/Mask R-CNN and RetinaNet (P3-P7) with the norm in the
backbone only, on the CPU or a GPU (``device``), and rejects the settings it cannot honour, by
name.

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

BACKENDS = ("torchvision", "detectron2")
MODEL_FAMILIES = ("faster_rcnn", "mask_rcnn", "retinanet")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("bn", "frozen_bn", "syncbn")
EXTRA_NORMS = ("none", "bn", "syncbn")  # norms added to the FPN / RoI heads ("none": no norm)
BOX_HEADS = ("2fc", "4conv1fc")  # detectron2 FastRCNNConvFCHead: 0 conv + 2 fc, or 4 conv + 1 fc
SAMPLERS = ("uniform", "repeat_factor")  # detectron2 TrainingSampler / RepeatFactorTrainingSampler
SIZE_SAMPLING = ("choice", "range")  # detectron2 INPUT.MIN_SIZE_TRAIN_SAMPLING
OPTIMIZERS = ("sgd",)
DEVICES = ("auto", "cpu", "cuda")  # torchvision backend; "auto": cuda when torch sees a GPU
# Annotation formats of the detection layouts (how a split's two paths are read):
#   coco:       annotations = a COCO instances JSON,      images = its image directory
#   lvis:       annotations = an LVIS v1 JSON,            images = the COCO root holding {train,val}2017
#   voc:        annotations = VOC<year>/ImageSets/Main/<split>.txt, images = VOC<year>/JPEGImages
#   cityscapes: annotations = gtFine/<split>,             images = leftImg8bit/<split>
DATASET_FORMATS = ("coco", "lvis", "voc", "cityscapes")

# Where each dataset layout keeps its detection splits (relative to the dataset root).
SPLIT_PATHS: dict[str, dict[str, Any]] = {
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
    # VOC07+12 trainval -> VOC07 test (the MoCo protocol)
    "voc": {
        "format": "voc",
        "train_json": "VOC2007/ImageSets/Main/trainval.txt",
        "train_images": "VOC2007/JPEGImages",
        "extra_train": [
            {"annotations": "VOC2012/ImageSets/Main/trainval.txt", "images": "VOC2012/JPEGImages"}
        ],
        "val_json": "VOC2007/ImageSets/Main/test.txt",
        "val_images": "VOC2007/JPEGImages",
    },
    "cityscapes": {
        "format": "cityscapes",
        "train_json": "gtFine/train",
        "train_images": "leftImg8bit/train",
        "val_json": "gtFine/val",
        "val_images": "leftImg8bit/val",
    },
    "lvis": {
        "format": "lvis",
        "train_json": "lvis/lvis_v1_train.json",
        "train_images": "coco",
        "val_json": "lvis/lvis_v1_val.json",
        "val_images": "coco",
    },
}


def _check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")


def _check_positive(where: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{where}: must be > 0, got {value!r}")


@dataclass(frozen=True)
class SplitPaths(Settings):
    """One more training split (e.g. VOC2012 trainval), read like the main one (``format``)."""

    annotations: str
    images: str


@dataclass(frozen=True)
class DatasetPaths(Settings):
    """A detection dataset; relative paths are relative to ``root``. ``format`` says how the
    annotation and image paths of a split are read (see ``DATASET_FORMATS``); ``extra_train``
    are further training splits concatenated to the first (VOC07+12)."""

    root: str
    format: str = "coco"
    train_json: str = "annotations/instances_train.json"
    train_images: str = "train"
    val_json: str = "annotations/instances_val.json"
    val_images: str = "val"
    extra_train: tuple[SplitPaths, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("dataset.format", self.format, DATASET_FORMATS)

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)

    def train_splits(self) -> tuple[tuple[Path, Path], ...]:
        """(annotations, images) of every training split, absolute."""
        first = (self.path("train_json"), self.path("train_images"))
        root = Path(self.root)
        return (first, *((root / s.annotations, root / s.images) for s in self.extra_train))


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

    # Training picks one shorter-side size per image at random (``min_size_sampling``
    # "choice": one of the sizes; "range": uniform between the first two); testing uses
    # ``min_size_test`` / ``max_size_test`` (0: the last ``min_size`` / ``max_size``).
    min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    min_size_sampling: str = "choice"
    min_size_test: int = 0
    max_size_test: int = 0
    hflip_prob: float = 0.5
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if isinstance(self.min_size, int):
            object.__setattr__(self, "min_size", (self.min_size,))
        if not self.min_size or any(s <= 0 for s in self.min_size):
            raise ValueError(f"input.min_size: expected positive sizes, got {self.min_size!r}")
        _check_positive("input.max_size", self.max_size)
        _check_choice("input.min_size_sampling", self.min_size_sampling, SIZE_SAMPLING)
        if self.min_size_sampling == "range" and len(self.min_size) != 2:
            raise ValueError(f"input.min_size: 'range' sampling needs [low, high], got {self.min_size!r}")
        for name in ("min_size_test", "max_size_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"input.{name}: expected >= 0 (0: as in training), got {getattr(self, name)!r}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"input.hflip_prob: expected a probability, got {self.hflip_prob!r}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"input.{name}: expected 3 values (RGB), got {getattr(self, name)!r}")

    @property
    def eval_min_size(self) -> int:
        return self.min_size_test or self.min_size[-1]

    @property
    def eval_max_size(self) -> int:
        return self.max_size_test or self.max_size


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
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"eval.score_threshold: expected 0 <= t < 1, got {self.score_threshold!r}")
        _check_positive("eval.detections_per_image", self.detections_per_image)


@dataclass(frozen=True)
class BenchmarkSettings(Settings):
    """One transfer benchmark. ``model`` is the detector family; ``fpn`` false builds the C4
    variant (res5 as the RoI head); ``norm`` the backbone's norm: ``bn`` (trainable BatchNorm),
    ``syncbn`` (the same, synchronised across processes) or ``frozen_bn`` (torchvision's default
    for ImageNet-supervised weights). ``protocol`` names the registry entry it came from."""

    name: str
    dataset: DatasetPaths
    dataset_name: str = ""  # the workflow config's dataset key (for the DAG); "" outside it
    protocol: str = ""  # the config/benchmarks registry entry it was built from; "" if none
    backend: str = "torchvision"
    model: str = "mask_rcnn"
    arch: str = "resnet50"
    fpn: bool = True
    norm: str = "syncbn"
    fpn_norm: str = "none"  # norm after the FPN's lateral and output convs (detectron2 FPN.NORM)
    box_head: str = "2fc"
    head_norm: str = "none"  # norm in the conv box head and the mask head (SoCo: syncbn)
    res5_extra_norm: bool = False  # C4: MoCo's Res5ROIHeadsExtraNorm (a norm after res5)
    precise_bn: bool = False  # recompute BN statistics before evaluation (detectron2 PreciseBN)
    sampler: str = "uniform"
    repeat_threshold: float = 0.001  # RepeatFactorTrainingSampler threshold (LVIS)
    train_fraction: float = 1.0  # < 1: train on a random image subset (semi-supervised COCO)
    subset_seed: int = 0  # the subset's sampling seed (fixed across finetuning seeds)
    trainable_layers: int = 5  # ResNet stages finetuned, counted from the top (5 = all + stem)
    device: str = "auto"  # torchvision backend; detectron2 places by its launch options (num_gpus)
    heads: HeadSettings = field(default_factory=HeadSettings)
    input: InputSettings = field(default_factory=InputSettings)
    solver: SolverSettings = field(default_factory=SolverSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("model", self.model, MODEL_FAMILIES)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("fpn_norm", self.fpn_norm, EXTRA_NORMS)
        _check_choice("head_norm", self.head_norm, EXTRA_NORMS)
        _check_choice("box_head", self.box_head, BOX_HEADS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("device", self.device, DEVICES)
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction: expected 0 < f <= 1, got {self.train_fraction!r}")
        if not self.fpn and (self.model == "retinanet" or self.fpn_norm != "none" or self.box_head != "2fc"):
            raise ValueError(
                "fpn: false (C4) has res5 as its box head and no FPN; expected model faster_rcnn or "
                f"mask_rcnn, fpn_norm 'none' and box_head '2fc' (got {self.model!r}, "
                f"{self.fpn_norm!r}, {self.box_head!r})"
            )
        if self.fpn and self.res5_extra_norm:
            raise ValueError("res5_extra_norm: only C4 detectors (fpn: false) have a res5 head")
        if not self.fpn and self.arch in ("resnet18", "resnet34"):
            raise ValueError(
                f"arch: {self.arch!r} has basic blocks; the C4 res5 head (fpn: false) needs "
                "resnet50 or resnet101"
            )
        if self.backend == "detectron2" and self.input.hflip_prob not in (0.0, 0.5):
            raise ValueError(
                f"input.hflip_prob: detectron2 flips with probability 0.5 or not at all; got "
                f"{self.input.hflip_prob!r}, expected 0.0 or 0.5"
            )
        if self.backend == "detectron2" and self.device != "auto":
            raise ValueError(
                f"device: {self.device!r} is the torchvision backend's; the detectron2 backend runs "
                "on the GPUs its launch options give (num_gpus, 0: the CPU); expected 'auto'"
            )
        if self.backend == "torchvision":
            self._check_torchvision_can_build()
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"trainable_layers: expected 0..5, got {self.trainable_layers!r}")
        # Frozen stages with batch statistics would drift while their weights stay fixed
        # (detectron2 freezes their norms too): ask for frozen_bn instead.
        if self.norm != "frozen_bn" and self.trainable_layers < 5:
            raise ValueError(
                f"trainable_layers: {self.trainable_layers} freezes stages, which needs "
                f"norm 'frozen_bn' (got {self.norm!r}); expected 5 with trainable norms"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # `device` says where the protocol runs, not what it is: while it is the default it is
        # left out, so the resolved settings (Snakemake's job params) of earlier results stay
        # the same and an upgrade does not re-run every finetune.
        if data["device"] == "auto":
            del data["device"]
        return data

    def _check_torchvision_can_build(self) -> None:
        """The torchvision backend builds every model family (FPN only; R-CNNs with a 2fc head)
        from COCO-format data; name the first setting it would otherwise silently ignore."""
        unsupported = {
            "fpn": (self.fpn, (True,)),
            "fpn_norm": (self.fpn_norm, ("none",)),
            "head_norm": (self.head_norm, ("none",)),
            "box_head": (self.box_head, ("2fc",)),
            "precise_bn": (self.precise_bn, (False,)),
            "sampler": (self.sampler, ("uniform",)),
            "dataset.format": (self.dataset.format, ("coco",)),
            "dataset.extra_train": (len(self.dataset.extra_train), (0,)),
            "input.min_size_sampling": (self.input.min_size_sampling, ("choice",)),
            "input.min_size_test": (self.input.min_size_test, (0, self.input.min_size[-1])),
            "input.max_size_test": (self.input.max_size_test, (0, self.input.max_size)),
        }
        for where, (value, supported) in unsupported.items():
            if value not in supported:
                raise ValueError(
                    f"{where}: {value!r} needs backend 'detectron2'; the torchvision backend "
                    f"supports {list(supported)}"
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
    the split paths. An entry with ``protocol: <registry name>`` starts from that registered
    benchmark (``config/benchmarks/*.yaml``); its other keys override the registry's values."""
    if "protocol" in entry:
        from regioncl.transfer.registry import load_registry

        registered = load_registry().get(entry["protocol"], f"benchmarks.{name}.protocol")
        registered.check_layout(dataset.layout, f"benchmarks.{name}.dataset")
        entry = registered.settings_with(entry)
    if dataset.layout not in SPLIT_PATHS:
        raise ValueError(
            f"benchmarks.{name}.dataset: {dataset.name!r} has layout {dataset.layout!r}, which "
            f"has no detection annotations; expected one of {sorted(SPLIT_PATHS)}"
        )
    paths = {"root": str(dataset.root), **SPLIT_PATHS[dataset.layout]}
    data = {**entry, "name": name, "dataset_name": dataset.name, "dataset": paths}
    return BenchmarkSettings.from_dict(data, f"benchmarks.{name}").to_dict()


def write_metrics_record(
    out: Path,
    benchmark: BenchmarkSettings,
    model_path: Path,
    saved: dict,
    metrics: dict[str, dict[str, float | None]],
    *,
    run: str | None,
    method: str | None,
    versions: dict[str, str],
) -> dict:
    """Write and return the metrics record both backends produce (what the tables read): the
    benchmark, labels (``method`` defaults to the weights' method), the finetuned ``saved``
    detector's seed and weights, ``metrics`` in percent, and the versions that made them
    (``versions``: the backend's own, beside torch, pycocotools and regioncl)."""
    import importlib.metadata

    import torch

    import regioncl
    from regioncl.io import write_json_atomic

    record = {
        "benchmark": benchmark.name,
        "run": run,
        "method": method or saved["method"],
        "model": str(model_path),
        "seed": saved["seed"],
        "weights": saved["weights"],
        "metrics": metrics,
        "versions": {
            "torch": torch.__version__,
            **versions,
            "pycocotools": importlib.metadata.version("pycocotools"),
            "regioncl": regioncl.__version__,
        },
    }
    write_json_atomic(out, record)
    return record


def load_finetuned_detector(model_path: Path, detector_format: str, benchmark: BenchmarkSettings) -> dict:
    """A finetuned detector file of either backend, checked to be ``detector_format`` and to
    have been finetuned on ``benchmark`` (evaluating it on another would score the wrong task)."""
    import torch

    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != detector_format:
        raise ValueError(f"{model_path}: expected format {detector_format!r}")
    if saved["benchmark"] != benchmark.name:
        raise ValueError(
            f"{model_path}: finetuned on benchmark {saved['benchmark']!r}, evaluating {benchmark.name!r}"
        )
    return saved
