"""Transfer benchmark definitions: what to finetune, on which data, with which solver.

A benchmark is one ``BenchmarkSettings``, built once from a plain dict (the workflow config's
``benchmarks.<name>`` entry resolved by ``regioncl.transfer.registry.resolve_benchmark``). Inner code gets typed values.

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
torchvision backend builds FPN Faster/Mask R-CNN and RetinaNet (P3-P7), with norms in the FPN
and heads and either box head, on the CPU or a GPU (``device``), and rejects the settings it
cannot honour, by name. ``BACKENDS`` is the one table of the backends (module, converted
weights, launch options, installation) that ``regioncl.transfer.backends`` dispatches on.
``transfer`` names the pretrained modules besides the backbone a benchmark loads
(``pretrained_modules``).

On the CPU a config sets slim heads (e.g. ``heads: {fpn_channels: 64, box_head_dim: 256,
roi_batch_size_per_image: 128}``): the same code path, smaller numbers.

Besides detection (``task`` "detection"), ``model: fcn`` is semantic segmentation (``task``
"sem_seg"): MoCo's dilated FCN (``regioncl.transfer.semseg``), which PLRC's Cityscapes column
uses, with its own settings in ``semseg``. It runs on the torchvision backend only, reads
``coco`` (instance masks painted as classes) or ``cityscapes`` data, and rejects the detectors'
settings by name when they are set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regioncl.archs import ARCHS
from regioncl.data.layouts import DATASET_FORMATS, SPLIT_PATHS
from regioncl.device import DEVICES
from regioncl.settings import Settings, bounded

# Each model family and the task it solves (which decides the backend module, the data and the metrics).
MODEL_TASKS = {"faster_rcnn": "detection", "mask_rcnn": "detection", "retinanet": "detection", "fcn": "sem_seg"}
MODEL_FAMILIES = tuple(MODEL_TASKS)
NORMS = ("bn", "frozen_bn", "syncbn")
EXTRA_NORMS = ("none", "bn", "syncbn")  # norms added to the FPN / RoI heads ("none": no norm)
BOX_HEADS = ("2fc", "4conv1fc")  # detectron2 FastRCNNConvFCHead: 0 conv + 2 fc, or 4 conv + 1 fc
# Pretrained modules a benchmark may load besides the backbone (regioncl.convert.MODULE_PREFIXES).
TRANSFERABLE = ("fpn", "box_head")
SAMPLERS = ("uniform", "repeat_factor")  # detectron2 TrainingSampler / RepeatFactorTrainingSampler
SIZE_SAMPLING = ("choice", "range")  # detectron2 INPUT.MIN_SIZE_TRAIN_SAMPLING
OPTIMIZERS = ("sgd",)

DETECTRON2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"


@dataclass(frozen=True)
class Backend:
    """A finetuning backend (``BenchmarkSettings.backend`` names one; ``regioncl.transfer.
    backends`` dispatches to it): its module per task it solves (each exposing ``finetune`` and
    ``evaluate`` with the same signatures), why it lacks the other tasks (``lacks``, said when a
    benchmark asks for one), the converted weights it loads (rule convert writes both), the launch
    options its two functions take besides the common ones, and, for a backend outside
    requirements.lock, the package that must import and how to install it."""

    modules: Mapping[str, str]
    weights_suffix: str
    launch_options: tuple[str, ...] = ()
    package: str | None = None
    install: str = ""
    lacks: Mapping[str, str] = field(default_factory=dict)


BACKENDS = {
    "torchvision": Backend(
        {"detection": "regioncl.transfer.torchvision_backend", "sem_seg": "regioncl.transfer.semseg"},
        ".tv.pth",
        launch_options=("num_workers",),
    ),
    "detectron2": Backend(
        {"detection": "regioncl.transfer.detectron2_backend"},
        ".d2.pkl",
        launch_options=("num_gpus", "num_machines", "machine_rank", "dist_url", "num_workers"),
        package="detectron2",
        install="pip install 'setuptools<81' wheel && pip install --no-build-isolation "
        f"'git+https://github.com/facebookresearch/detectron2.git@{DETECTRON2_COMMIT}' "
        "(full recipe, GPU builds included: docs/transfer.md, 'detectron2 extras')",
        lacks={"sem_seg": "detectron2 has no dilated-FCN head (MoCo's Cityscapes recipe)"},
    ),
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
    train_json: str = SPLIT_PATHS["embedded"]["train_json"]
    train_images: str = SPLIT_PATHS["embedded"]["train_images"]
    val_json: str = SPLIT_PATHS["embedded"]["val_json"]
    val_images: str = SPLIT_PATHS["embedded"]["val_images"]
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
    lr: float = bounded(0.02, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(1e-4, ge=0)
    weight_decay_norm: float = bounded(0.0, ge=0)  # detectron2's default: no decay on norm parameters
    iterations: int = bounded(90_000, ge=1)
    batch_size: int = bounded(16, ge=1)
    warmup_iters: int = bounded(1000, ge=0)
    warmup_factor: float = bounded(0.001, ge=0, le=1)
    lr_steps: tuple[int, ...] = (60_000, 80_000)
    gamma: float = bounded(0.1, gt=0)
    checkpoint_every: int = bounded(5000, ge=1)  # iterations between resumable checkpoints in the workdir

    def __post_init__(self) -> None:
        _check_choice("solver.optimizer", self.optimizer, OPTIMIZERS)
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
class SemSegSettings(Settings):
    """The dilated FCN's head and training crops (``model: fcn``; ``regioncl.transfer.semseg``).

    Training resizes each image by a factor drawn uniformly from ``scale_range``, then takes a
    ``crop_size`` square (padded with the ignore label where the image is smaller) and flips it
    with ``input.hflip_prob``; evaluation sees whole images at their own size."""

    head_channels: int = bounded(256, ge=1)  # the two 3x3 convs after res5
    head_dilation: int = bounded(6, ge=1)
    crop_size: int = bounded(769, ge=1)
    scale_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"semseg.scale_range: expected [low, high] with 0 < low <= high, got {list(self.scale_range)}")


# Settings only the detectors read: a semantic-segmentation benchmark must leave them at their
# defaults, so none is set in a config and silently ignored.
DETECTION_ONLY = (
    "fpn", "fpn_norm", "box_head", "head_norm", "res5_extra_norm", "precise_bn", "sampler",
    "repeat_threshold", "train_fraction", "subset_seed", "heads", "input.min_size", "input.max_size",
    "input.min_size_sampling", "input.min_size_test", "input.max_size_test", "eval.score_threshold",
    "eval.detections_per_image", "eval.batch_size",
)
SEMSEG_FORMATS = ("coco", "cityscapes")  # instance masks painted as classes; Cityscapes' label ids


@dataclass(frozen=True)
class BenchmarkSettings(Settings):
    """One transfer benchmark. ``model`` is the detector family (or ``fcn``, semantic
    segmentation: ``task``); ``fpn`` false builds the C4
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
    # Pretrained modules besides the backbone loaded when the weights have them and the detector
    # has that part (``pretrained_modules``); [] = backbone only (SoCo's and ReSim-FPN's ablation).
    transfer: tuple[str, ...] = TRANSFERABLE
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
    semseg: SemSegSettings = field(default_factory=SemSegSettings)  # model fcn only

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, tuple(BACKENDS))
        _check_choice("model", self.model, MODEL_FAMILIES)
        self._check_backend_solves_task()
        if self.task == "sem_seg":
            self._check_fcn_can_build()
        elif self.semseg != SemSegSettings():
            raise ValueError(f"semseg: only model 'fcn' reads it; benchmark {self.name!r} has model {self.model!r}")
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("fpn_norm", self.fpn_norm, EXTRA_NORMS)
        _check_choice("head_norm", self.head_norm, EXTRA_NORMS)
        _check_choice("box_head", self.box_head, BOX_HEADS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("device", self.device, DEVICES)
        for module in self.transfer:
            _check_choice("transfer", module, TRANSFERABLE)
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
        if self.backend == "torchvision" and self.task == "detection":
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
        if tuple(data["transfer"]) == TRANSFERABLE:  # likewise the default transfer
            del data["transfer"]
        if self.task != "sem_seg":  # and the semseg section, which detectors leave at its defaults
            del data["semseg"]
        return data

    @property
    def task(self) -> str:
        """What the model solves: "detection" (boxes, masks) or "sem_seg" (a class per pixel)."""
        return MODEL_TASKS[self.model]

    @property
    def pretrained_modules(self) -> tuple[str, ...]:
        """The converted weights' modules this detector loads (the others are left out, by name):
        the backbone; the FPN when ``transfer`` lists it and the detector has one; the box head
        (a 4conv1fc head, SoCo's) only into a 4conv1fc R-CNN head -- a 2fc head's ``fc1`` has the
        same shape but sees other inputs, so it must never take it."""
        modules = ["backbone"]
        if self.task == "sem_seg":  # the dilated FCN has neither an FPN nor a box head
            return tuple(modules)
        if self.fpn and "fpn" in self.transfer:
            modules.append("fpn")
        if self.fpn and self.model != "retinanet" and self.box_head == "4conv1fc" and "box_head" in self.transfer:
            modules.append("box_head")
        return tuple(modules)

    def _check_backend_solves_task(self) -> None:
        backend = BACKENDS[self.backend]
        if self.task not in backend.modules:
            able = [name for name, b in BACKENDS.items() if self.task in b.modules]
            raise ValueError(
                f"backend: benchmark {self.name!r} has model {self.model!r} ({self.task}), which backend "
                f"{self.backend!r} does not build: {backend.lacks.get(self.task, 'not implemented')}; "
                f"expected backend {' or '.join(map(repr, able))}"
            )

    def _check_fcn_can_build(self) -> None:
        """The dilated FCN reads COCO-format or Cityscapes data of one training split and none of
        the detectors' settings; name the first one set."""
        _check_choice("dataset.format", self.dataset.format, SEMSEG_FORMATS)
        if self.dataset.extra_train:
            raise ValueError(f"dataset.extra_train: model 'fcn' trains on one split; got {len(self.dataset.extra_train)} more")
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name in DETECTION_ONLY:
            top, *nested = name.split(".")
            default = fields[top].default
            if default is dataclasses.MISSING:
                default = fields[top].default_factory()
            value = getattr(self, top)
            for part in nested:
                default, value = getattr(default, part), getattr(value, part)
            if value != default:
                raise ValueError(
                    f"{name}: {value!r} is a detector's setting; model 'fcn' (benchmark {self.name!r}) does "
                    f"not read it, expected the default {default!r} (its own settings are under semseg)"
                )

    def _check_torchvision_can_build(self) -> None:
        """The torchvision backend builds every model family (FPN only; R-CNNs with a 2fc or
        4conv1fc head, norms in FPN and heads) from COCO-format data; name the first setting it
        would otherwise silently ignore."""
        unsupported = {
            "fpn": (self.fpn, (True,)),
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
