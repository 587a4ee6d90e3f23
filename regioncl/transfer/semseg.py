"""Semantic segmentation with a dilated FCN (``model: fcn``): the torchvision backend's module for
the "sem_seg" task, with ``finetune`` and ``evaluate`` like ``regioncl.transfer.torchvision_backend``.

The protocol is MoCo's Cityscapes recipe, which PLRC follows (spec_plrc §4.4: "a FCN-based
structure ... the classification is obtained by an additional 1x1 convolutional layer"):

    c5     = ResNet(image)                 conv5 at stride 1, its 3x3 convs dilated 2: output stride 16
    h      = ReLU(BN(conv3x3_d6(ReLU(BN(conv3x3_d6(c5))))))     two 3x3 convs of 256 channels, dilation 6
    logits = upsample_bilinear(conv1x1(h), image size)           C classes per pixel
    loss   = cross-entropy over the pixels not labelled IGNORE_LABEL (255)

What comes from where ([R]: the reference, MoCo's appendix as the spec reads it; ours: chosen
here where it is silent):

- [R] R50, conv5's 3x3 convs at dilation 2 and stride 1; two 3x3 conv(256) + BN + ReLU at
  dilation 6; a 1x1 classifier; 19 Cityscapes train classes.
- [R] training on train_fine (2975 images): random scale [0.5, 2.0], 769x769 crops, flips, batch
  16, weight decay 1e-4, LR 0.01 decayed x0.1 at 70% and 90% of 90k iterations; single-scale
  inference at the full image size; mIoU on val; the mean of 5 trials (seeds).
- ours: *every* conv5 3x3 conv is dilated, the first block's too (MoCo's wording, and detectron2's
  RES5_DILATION; torchvision's ``replace_stride_with_dilation`` keeps that one at dilation 1 and
  refuses basic blocks, so ``dilate_res5`` sets the stage for every arch); SGD momentum 0.9, no
  weight decay on norm parameters, no warm-up (the recipe names none); trainable (Sync)BN in
  backbone and head; crops padded where a scaled image is smaller (image with the mean pixel,
  labels with the ignore label); logits upsampled before the loss; the classifier's default
  PyTorch initialisation.

Determinism and resume as the detectors': the data order of epoch ``e`` is a permutation drawn
from ``(seed, e)``, each iteration's scales, crops and flips from ``(seed, iteration)``, so a
resumed run (model and optimizer state from ``workdir/<identity key>``) continues exactly as an
uninterrupted one on the CPU. Evaluation counts a confusion matrix over the val images
(``regioncl.transfer.semseg_eval``) and writes the metrics record with ``sem_seg.mIoU``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models._utils import IntermediateLayerGetter

from regioncl.convert import select_modules
from regioncl.progress import Progress
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.identity import finetune_identity
from regioncl.transfer.loading import check_loadable, load_problems, report_left_out, shapes_of
from regioncl.transfer.records import load_finetuned_detector, write_metrics_record
from regioncl.transfer.semseg_data import IGNORE_LABEL, SemSegSplit, normalise, semseg_split, training_crop
from regioncl.transfer.semseg_eval import confusion_matrix, sem_seg_metrics
from regioncl.transfer.torchvision_backend import (
    NORM_LAYERS,
    RESUME_MAY_CHANGE,
    TRAINABLE_STAGES,
    batch_indices,
    build_optimizer,
    iteration_loader,
    publish_finetuned,
    select_device,
    train_iterations,
)
from regioncl.weights import read_torchvision_weights

FCN_FORMAT = "regioncl.sem_seg_fcn/1"
RES5_DILATION = 2  # conv5 at stride 1: output stride 16 (FCN-16s)
CROP_STREAM = 2  # the random stream of scales, crops and flips (the detectors' use 0 and 1)


def dilate_res5(resnet: torchvision.models.ResNet, dilation: int = RES5_DILATION) -> None:
    """Set conv5 (``layer4``) in place to stride 1 with every 3x3 conv dilated ``dilation`` (and
    padded to keep the size): the same parameters, an output stride of 16 instead of 32."""
    for module in resnet.layer4.modules():
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilation, dilation)


class DilatedFCN(nn.Module):
    """(B, 3, H, W) standardised images -> (B, C, H, W) logits; with ``labels`` (B, H, W) int64
    in training mode, ``{"loss_sem_seg": cross-entropy}`` instead (the detectors' loss-dict form,
    so ``torchvision_backend.train_step`` steps it)."""

    def __init__(self, benchmark: BenchmarkSettings, num_classes: int) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, benchmark.arch)(weights=None, norm_layer=NORM_LAYERS[benchmark.norm])
        dilate_res5(resnet)
        trainable = TRAINABLE_STAGES[: benchmark.trainable_layers + (benchmark.trainable_layers == 5)]
        for name, parameter in resnet.named_parameters():
            if not name.startswith(trainable):
                parameter.requires_grad_(False)
        # `backbone.body` as in torchvision's detectors, so converted weights load by the same names.
        self.backbone = nn.ModuleDict({"body": IntermediateLayerGetter(resnet, return_layers={"layer4": "c5"})})
        channels, dilation = benchmark.semseg.head_channels, benchmark.semseg.head_dilation
        layers: list[nn.Module] = []
        for in_channels in (resnet.inplanes, channels):  # inplanes: C5's width (512 or 2048)
            layers += [
                nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        features = self.backbone["body"](images)["c5"]
        logits = F.interpolate(self.classifier(self.head(features)), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if labels is None:
            return logits
        # Summed over labelled pixels and divided by their count (at least 1): a crop that is all
        # padding gives 0, not the NaN of an empty mean.
        counted = (labels != IGNORE_LABEL).sum().clamp(min=1)
        return {"loss_sem_seg": F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum") / counted}


def build_fcn(benchmark: BenchmarkSettings, num_classes: int) -> DilatedFCN:
    model = DilatedFCN(benchmark, num_classes)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if benchmark.norm == "syncbn" else model


def load_pretrained_backbone(model: DilatedFCN, weights: Path, benchmark: BenchmarkSettings) -> dict:
    """Load the ResNet of converted torchvision weights into ``model``'s backbone, by the rules of
    ``regioncl.transfer.loading``: every backbone tensor (BatchNorm counters aside) provided, no
    tensor without a place, no shape differing, else raise naming the keys. Modules besides the
    backbone (an FPN, a box head) are left out and named on stderr. Returns the weights file's
    fields other than the state dict."""
    payload = read_torchvision_weights(weights, benchmark.arch, "the benchmark")
    provided, left_out = select_modules(payload["state_dict"], "torchvision", benchmark.pretrained_modules)
    expected = shapes_of(model.state_dict())
    required = [k for k in expected if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")]
    check_loadable(weights, load_problems(shapes_of(provided), expected, required), into=f"{benchmark.name}'s FCN")
    model.load_state_dict(provided, strict=False)
    report_left_out(weights, benchmark.name, left_out, "torchvision")
    return {k: v for k, v in payload.items() if k != "state_dict"}


def crop_draws(seed: int, iteration: int, benchmark: BenchmarkSettings) -> list[tuple[float, tuple[float, float], bool]]:
    """Per image of one iteration's batch: (scale, crop corner fractions (y, x), flip), drawn
    from the iteration's own stream."""
    rng = np.random.default_rng([seed, CROP_STREAM, iteration])
    low, high = benchmark.semseg.scale_range
    draws = []
    for _ in range(benchmark.solver.batch_size):
        scale = float(rng.uniform(low, high))
        corner = (float(rng.random()), float(rng.random()))
        draws.append((scale, corner, bool(rng.random() < benchmark.input.hflip_prob)))
    return draws


class CropBatches(torch.utils.data.Dataset):
    """Item ``i``: the (B, 3, S, S) standardised crops and (B, S, S) labels of iteration
    ``first + i``; a pure function of (seed, iteration), like the detectors' ``IterationBatches``."""

    def __init__(self, data: SemSegSplit, benchmark: BenchmarkSettings, seed: int, first: int, last: int) -> None:
        self.data, self.benchmark, self.seed, self.first, self.last = data, benchmark, seed, first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        iteration = self.first + item
        indices = batch_indices(self.seed, iteration, self.benchmark.solver.batch_size, len(self.data))
        images, labels = [], []
        for index, (scale, corner, flip) in zip(indices, crop_draws(self.seed, iteration, self.benchmark), strict=True):
            image = normalise(self.data.load_image(index), self.benchmark.input)
            crop, label = training_crop(image, self.data.load_label(index), scale, corner, flip, self.benchmark.semseg.crop_size)
            images.append(crop)
            labels.append(label)
        return torch.stack(images), torch.stack(labels)


def finetune(
    benchmark: BenchmarkSettings,
    weights: Path | None,
    seed: int,
    out: Path,
    workdir: Path,
    *,
    metrics: Path | None = None,
    num_workers: int = 0,
) -> None:
    """Train the benchmark's FCN from ``weights`` (``None``: random init) on ``benchmark.device``
    and write ``out`` (and ``metrics``: per-iteration loss and lr). ``num_workers`` processes
    prepare the next batches (0: this one does); the result does not depend on it. Resumes from
    ``workdir/<identity key>/checkpoint_last.pt`` when present; saves it every
    ``solver.checkpoint_every`` iterations."""
    solver = benchmark.solver
    device = select_device(benchmark)
    identity = finetune_identity(benchmark, seed, weights, RESUME_MAY_CHANGE)
    workdir = Path(workdir) / identity["key"]
    data = semseg_split(benchmark.dataset, "train")
    torch.manual_seed(seed)
    model = build_fcn(benchmark, num_classes=len(data.class_names))
    source = {"method": "random"}
    if weights is not None:
        source = load_pretrained_backbone(model, weights, benchmark)
    model.to(device)
    optimizer = build_optimizer(model, solver)

    log = train_iterations(
        model, optimizer, solver, identity["key"], workdir, f"finetune {benchmark.name} seed {seed}",
        lambda start: iteration_loader(CropBatches(data, benchmark, seed, start, solver.iterations), num_workers),
        lambda iteration, batch: (batch[0].to(device), batch[1].to(device)),
    )
    publish_finetuned(
        out, metrics, log, model, FCN_FORMAT, benchmark, seed, identity, source["method"],
        class_names=list(data.class_names),
    )


@torch.no_grad()
def confusion_on(model: nn.Module, data: SemSegSplit, benchmark: BenchmarkSettings, device: torch.device) -> torch.Tensor:
    """The (C, C) confusion matrix of ``model`` over every image of ``data``, each seen whole at
    its own size (single-scale inference)."""
    model.eval()
    num_classes = len(data.class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    progress = Progress(len(data), desc="evaluate (images)")
    for index in range(len(data)):
        image = normalise(data.load_image(index), benchmark.input)[None].to(device)
        prediction = model(image).argmax(dim=1)[0].cpu()
        confusion += confusion_matrix(prediction, data.load_label(index), num_classes)
        progress.update(index + 1)
    progress.close()
    return confusion


def evaluate(
    benchmark: BenchmarkSettings,
    model_path: Path,
    out: Path,
    *,
    run: str | None = None,
    method: str | None = None,
) -> dict:
    """Score the finetuned FCN on the benchmark's val split (on ``benchmark.device``): write and
    return the metrics record, ``metrics.sem_seg`` with mIoU, fwIoU, mACC, pACC and per-class IoU."""
    device = select_device(benchmark)
    saved = load_finetuned_detector(model_path, FCN_FORMAT, benchmark)
    data = semseg_split(benchmark.dataset, "val")
    if list(data.class_names) != saved["class_names"]:
        raise ValueError(
            f"{benchmark.dataset.path('val_json')}: classes {list(data.class_names)} differ from those the "
            f"model was trained on {saved['class_names']}"
        )
    model = build_fcn(benchmark, num_classes=len(saved["class_names"]))
    model.load_state_dict(saved["state_dict"])
    confusion = confusion_on(model.to(device), data, benchmark, device)
    metrics = {"sem_seg": sem_seg_metrics(confusion, data.class_names)}
    return write_metrics_record(
        out, benchmark, model_path, saved, metrics, run=run, method=method,
        versions={"torchvision": torchvision.__version__},
    )
