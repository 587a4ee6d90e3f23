"""A fast representation probe: do frozen backbone features of the objects name their class?

    f_i = mean over an s x s RoIAlign grid of C_k(image) in box_i       (frozen backbone, stage k)
    p(y | f) = softmax(W standardize(f) + b)                               (multinomial logistic)
    W, b = argmin  mean_i CE(p(. | f_i), y_i) + weight_decay / 2 ||W||^2   (train-split boxes)
    accuracy = the share of val-split boxes whose argmax p is their class, in percent

The boxes are the ground-truth boxes of a COCO-format labeled split (the embedded dataset's
``train`` and ``val``); images are seen at their stored size, ImageNet-normalised, as the
pretraining views are. BatchNorm statistics are re-estimated over the train-split images
before features are read, the same for every checkpoint: pretraining views are
small crops, the probe sees whole images, and a random initialisation has no statistics at
all. The weights are never trained. The result is deterministic on a machine and thread count
(full-batch L-BFGS in float64 from zeros), so the probe gives one number per checkpoint without
seeds, in under a minute on one CPU thread where a 3-seed finetune takes ten.

The record it writes is a metrics record (``regioncl.transfer.records``, read by
``regioncl.tables.metrics``): ``metrics.probe.accuracy`` beside the run, method and benchmark
it labels, so tables show it as one more column.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from regioncl.augment import IMAGENET_MEAN, IMAGENET_STD
from regioncl.archs import ARCHS
from regioncl.models.backbone import ResNetBackbone
from regioncl.settings import Settings
from regioncl.transfer.coco_data import CocoDetection
from regioncl.transfer.loading import check_loadable, load_problems, shapes_of
from regioncl.transfer.records import write_record
from regioncl.weights import read_torchvision_weights

STAGE_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}  # px of the input per feature cell
TORCHVISION_PREFIX = "backbone.body."  # the ResNet inside torchvision's detection models


@dataclass(frozen=True)
class ProbeSettings(Settings):
    stage: Literal["c2", "c3", "c4", "c5"] = "c4"
    roi_size: int = 2  # s: RoIAlign grid per box, averaged into one vector
    weight_decay: float = 1e-3  # on the standardised features' logistic weights
    max_iterations: int = 500  # L-BFGS iterations
    seed: int = 0  # the random initialisation of `--weights none`

    def __post_init__(self) -> None:
        if self.roi_size < 1:
            raise ValueError(f"probe: roi_size must be >= 1, got {self.roi_size}")
        if self.weight_decay < 0:
            raise ValueError(f"probe: weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class SplitPaths:
    annotations: Path  # COCO instances JSON
    images: Path  # its image directory


def embedded_splits(root: Path) -> dict[str, SplitPaths]:
    """The labeled splits of a dataset in the embedded layout (``docs/architecture.md``)."""
    return {
        split: SplitPaths(Path(root) / "annotations" / f"instances_{split}.json", Path(root) / split)
        for split in ("train", "val")
    }


def load_backbone(weights: Path | None, arch: str, seed: int) -> tuple[ResNetBackbone, str]:
    """The ResNet of converted torchvision weights (``regioncl.torchvision/1``), or randomly
    initialised from ``seed`` (``weights=None``); returns it with the weights' method name.

    Every ResNet tensor must be in the file, with the right shape; errors name the file.
    """
    if arch not in ARCHS:
        raise ValueError(f"probe: arch {arch!r} is not one of {list(ARCHS)}")
    torch.manual_seed(seed)
    backbone = ResNetBackbone(arch)
    if weights is None:
        return backbone, "random"
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    payload = read_torchvision_weights(weights, arch, "the probe")
    provided = {
        key.removeprefix(TORCHVISION_PREFIX): tensor
        for key, tensor in payload["state_dict"].items()
        if key.startswith(TORCHVISION_PREFIX)
    }
    expected = shapes_of(backbone.state_dict())
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    check_loadable(weights, load_problems(shapes_of(provided), expected, required), into=f"a {arch} backbone")
    backbone.load_state_dict(provided, strict=False)
    return backbone, str(payload.get("method", "unknown"))


def normalise(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in 0..1 -> (1, 3, H, W) ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image - mean) / std).unsqueeze(0)


@torch.no_grad()
def reestimate_batchnorm(backbone: ResNetBackbone, batches: Iterable[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their average over ``batches``
    ((B, 3, H, W) ImageNet-normalised images, one forward each); leaves the backbone in eval mode."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    backbone.train()
    for batch in batches:
        backbone.forward_stages(batch)
    backbone.eval()


@torch.no_grad()
def box_features(
    backbone: ResNetBackbone, data: CocoDetection, settings: ProbeSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) pooled features and (N,) labels 0..K-1 of every ground-truth box of ``data``."""
    backbone.eval()
    features, labels = [], []
    for index in range(len(data)):
        image, target = data[index]
        if len(target["boxes"]) == 0:
            continue
        stage = backbone.forward_stages(normalise(image))[settings.stage]  # (1, C, H/stride, W/stride)
        pooled = roi_align(
            stage,
            [target["boxes"]],  # (n, 4) x1y1x2y2 in image px
            output_size=settings.roi_size,
            spatial_scale=1 / STAGE_STRIDES[settings.stage],
            sampling_ratio=2,
            aligned=True,
        )  # (n, C, s, s)
        features.append(pooled.mean(dim=(2, 3)))
        labels.append(target["labels"] - 1)
    return torch.cat(features).double(), torch.cat(labels)


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: ProbeSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardisation (mean, std) of ``features`` (N, C) and the logistic weights (C, K), bias (K)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=settings.max_iterations, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + settings.weight_decay / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return mean, std, weight.detach(), bias.detach()


def probe_accuracy(
    backbone: ResNetBackbone, splits: dict[str, SplitPaths], settings: ProbeSettings
) -> dict[str, Any]:
    """Accuracy (percent) on the val boxes of a logistic classifier fit on the train boxes."""
    train = CocoDetection(splits["train"].annotations, splits["train"].images, with_masks=False)
    val = CocoDetection(splits["val"].annotations, splits["val"].images, with_masks=False)
    if val.category_ids != train.category_ids:
        raise ValueError(
            f"{splits['val'].annotations}: categories {val.category_ids} differ from the train split's "
            f"{train.category_ids} ({splits['train'].annotations})"
        )
    reestimate_batchnorm(backbone, (normalise(train.load_image(index)) for index in range(len(train))))
    train_x, train_y = box_features(backbone, train, settings)
    val_x, val_y = box_features(backbone, val, settings)
    if len(train_y) == 0 or len(val_y) == 0:
        empty = splits["train" if len(train_y) == 0 else "val"].annotations
        raise ValueError(f"{empty}: no boxes to probe")
    mean, std, weight, bias = fit_logistic(train_x, train_y, len(train.category_ids), settings)
    predicted = (((val_x - mean) / std) @ weight + bias).argmax(dim=1)
    train_predicted = (((train_x - mean) / std) @ weight + bias).argmax(dim=1)
    return {
        "accuracy": float((predicted == val_y).double().mean() * 100),
        "train_accuracy": float((train_predicted == train_y).double().mean() * 100),
        "train_boxes": len(train_y),
        "val_boxes": len(val_y),
        "feature_dim": int(train_x.shape[1]),
    }


def run_probe(
    weights: Path | None,
    arch: str,
    data: Path,
    out: Path,
    settings: ProbeSettings,
    *,
    run: str | None = None,
    benchmark: str = "probe",
) -> dict[str, Any]:
    """Probe ``weights`` (None: random init) on the labeled splits of ``data``; write the record."""
    start = time.perf_counter()
    backbone, method = load_backbone(weights, arch, settings.seed)
    result = probe_accuracy(backbone, embedded_splits(data), settings)
    return write_record(
        out,
        benchmark=benchmark,
        run=run or (Path(weights).name.split(".")[0] if weights else "random"),
        method=method,
        seed=0,
        weights=str(weights or "none"),
        arch=arch,
        data=str(data),
        metrics={"probe": {"accuracy": result["accuracy"]}},
        probe={**{k: v for k, v in result.items() if k != "accuracy"}, "settings": settings.to_dict()},
        seconds=round(time.perf_counter() - start, 1),
        versions={"torchvision": torchvision.__version__},  # its roi_align pools the features
    )


# ---------------------------------------------------------------------------------------------
# The workflow's probe jobs (read by workflow/rules/probe.smk from the resolved plan)


def probe_targets(plan: Any) -> list[str]:
    """``results/probe/{benchmark}/{run}.json`` for every (run, benchmark) the plan finetunes
    whose benchmark's dataset is in the embedded layout: the CPU-scale data, where the probe
    takes seconds (a probe over COCO's 118k images would not)."""
    pairs = dict.fromkeys((job.run, job.benchmark) for job in plan.jobs)
    return [
        f"results/probe/{benchmark}/{run}.json"
        for run, benchmark in pairs
        if plan.dataset(plan.benchmark(benchmark)["dataset_name"]).layout == "embedded"
    ]


def probe_weights(plan: Any, run: str) -> list[str]:
    """The converted torchvision weights a run's probe reads; none for a baseline (random init)."""
    return [] if run in plan.baselines else [f"results/weights/{run}.tv.pth"]
