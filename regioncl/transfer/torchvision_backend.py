"""Finetune torchvision's Faster / Mask R-CNN and RetinaNet (ResNet-FPN) from converted weights.

Runs on ``benchmark.device`` (``auto``: the GPU when there is one); checkpoints and the
finetuned detector are loadable on the CPU.

Determinism and exact resume: the data order of epoch ``e`` is a permutation drawn from
``(seed, e)``; the flips and torch's global RNG (RPN / RoI sampling, multi-scale resize) are
re-seeded from ``(seed, iteration)`` at every iteration. So a resumed run needs only the
model and optimizer state to continue exactly as an uninterrupted one (on the CPU of the same
machine, same thread count; on a GPU only up to the nondeterminism of CUDA kernels such as
RoIAlign's backward), and the learning rate is a pure function of the iteration.
"""

from __future__ import annotations

import bisect
import functools
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from regioncl.convert import TORCHVISION_FORMAT
from regioncl.engine.dist import wants_cuda
from regioncl.io import atomic_path
from regioncl.transfer.benchmarks import BenchmarkSettings, SolverSettings
from regioncl.transfer.coco_data import CocoDetection, hflip
from regioncl.transfer.subsets import training_annotations

DETECTOR_FORMAT = "regioncl.detector/1"
CHECKPOINT_NAME = "checkpoint_last.pt"
ORDER_STREAM, ITERATION_STREAM = 0, 1  # independent random streams derived from the seed

# 'syncbn' builds BatchNorm2d and converts it: SyncBatchNorm behaves as BatchNorm2d unless a
# process group is initialised, so one code path serves one CPU process and many GPUs.
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "syncbn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
}
NORM_MODULES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)  # parameters get weight_decay_norm
# torchvision's convention: trainable_layers=k trains the first k; 5 also trains the stem's bn1.
TRAINABLE_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1", "bn1")


def build_backbone(
    benchmark: BenchmarkSettings, stages: tuple[int, ...] = (1, 2, 3, 4), p6p7: bool = False
) -> BackboneWithFPN:
    """ResNet + FPN with ``heads.fpn_channels`` channels, randomly initialised.

    The FPN reads the ResNet ``stages`` (1..4: C2..C5) and adds P6 max-pooled from its top
    level (R-CNN: P2..P6) or, with ``p6p7``, P6 and P7 as stride-2 convs on C5 (RetinaNet:
    P3..P7 from C3..C5, as detectron2's ``build_retinanet_resnet_fpn_backbone``; torchvision's
    ``LastLevelP6P7`` reads P5 instead when C5 and the FPN have the same width). Like
    torchvision's ``resnet_fpn_backbone`` but with a configurable FPN width; stages above
    ``trainable_layers`` (counted from layer4) get ``requires_grad = False``.
    """
    resnet = getattr(torchvision.models, benchmark.arch)(
        weights=None, norm_layer=NORM_LAYERS[benchmark.norm]
    )
    trainable = TRAINABLE_STAGES[: benchmark.trainable_layers + (benchmark.trainable_layers == 5)]
    for name, parameter in resnet.named_parameters():
        if not name.startswith(trainable):
            parameter.requires_grad_(False)
    c5_channels = resnet.inplanes  # 512 (BasicBlock) or 2048 (Bottleneck)
    fpn_channels = benchmark.heads.fpn_channels
    backbone = BackboneWithFPN(
        resnet,
        return_layers={f"layer{stage}": str(level) for level, stage in enumerate(stages)},
        in_channels_list=[c5_channels // 8 * 2 ** (stage - 1) for stage in stages],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(c5_channels, fpn_channels) if p6p7 else None,
    )
    if benchmark.norm == "syncbn":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone


def build_faster_rcnn(benchmark: BenchmarkSettings, num_classes: int) -> FasterRCNN:
    return FasterRCNN(num_classes=None, **detector_parts(benchmark, num_classes))


def build_mask_rcnn(benchmark: BenchmarkSettings, num_classes: int) -> MaskRCNN:
    parts = detector_parts(benchmark, num_classes)
    channels = benchmark.heads.mask_head_channels
    mask_head = MaskRCNNHeads(parts["backbone"].out_channels, (channels,) * 4, 1)
    mask_predictor = MaskRCNNPredictor(channels, channels, num_classes + 1)
    return MaskRCNN(num_classes=None, mask_head=mask_head, mask_predictor=mask_predictor, **parts)


class ForegroundLabelRetinaNet(RetinaNet):
    """torchvision's RetinaNet scoring the K object classes, speaking the R-CNNs' labels.

    Targets and detections carry labels 1..K (0 is the R-CNNs' background); RetinaNet's
    sigmoid classifier has no background class, so it sees 0..K-1, as detectron2's does.
    """

    def forward(
        self, images: list[torch.Tensor], targets: list[dict] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if targets is not None:
            targets = [{**target, "labels": target["labels"] - 1} for target in targets]
        outputs = super().forward(images, targets)
        if self.training:
            return outputs
        return [{**output, "labels": output["labels"] + 1} for output in outputs]


def build_retinanet(benchmark: BenchmarkSettings, num_classes: int) -> RetinaNet:
    """RetinaNet on P3..P7 with torchvision's defaults, which are detectron2's Base-RetinaNet:
    3 scales x 3 ratios of anchors 32..512, IoU thresholds (0.4, 0.5), focal loss (0.25, 2),
    L1 box loss (smooth L1 with beta 0), NMS 0.5 over the top 1000 candidates per level."""
    size = benchmark.input
    return ForegroundLabelRetinaNet(
        build_backbone(benchmark, stages=(2, 3, 4), p6p7=True),
        num_classes,
        min_size=size.min_size,
        max_size=size.max_size,
        image_mean=list(size.pixel_mean),
        image_std=list(size.pixel_std),
        score_thresh=benchmark.eval.score_threshold,
        detections_per_img=benchmark.eval.detections_per_image,
    )


DETECTOR_BUILDERS = {
    "faster_rcnn": build_faster_rcnn,
    "mask_rcnn": build_mask_rcnn,
    "retinanet": build_retinanet,
}


def detector_parts(benchmark: BenchmarkSettings, num_classes: int) -> dict:
    """Keyword arguments shared by torchvision's R-CNN constructors (``num_classes`` objects)."""
    backbone = build_backbone(benchmark)
    heads, size = benchmark.heads, benchmark.input
    box_pool_size = 7  # torchvision's MultiScaleRoIAlign output for the box head
    return {
        "backbone": backbone,
        "box_head": TwoMLPHead(backbone.out_channels * box_pool_size**2, heads.box_head_dim),
        "box_predictor": FastRCNNPredictor(heads.box_head_dim, num_classes + 1),
        "min_size": size.min_size,
        "max_size": size.max_size,
        "image_mean": list(size.pixel_mean),
        "image_std": list(size.pixel_std),
        "rpn_batch_size_per_image": heads.rpn_batch_size_per_image,
        "box_batch_size_per_image": heads.roi_batch_size_per_image,
        "rpn_pre_nms_top_n_train": heads.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": heads.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": heads.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": heads.rpn_post_nms_top_n_test,
        "box_score_thresh": benchmark.eval.score_threshold,
        "box_detections_per_img": benchmark.eval.detections_per_image,
    }


def build_detector(benchmark: BenchmarkSettings, num_classes: int) -> nn.Module:
    return DETECTOR_BUILDERS[benchmark.model](benchmark, num_classes)


def load_pretrained_weights(model: nn.Module, weights: Path, arch: str) -> dict:
    """Load converted torchvision weights (``regioncl.torchvision/1``) into ``model``.

    Every backbone tensor of the model (BatchNorm counters aside) must be provided, and every
    provided tensor must exist with the same shape; otherwise raise naming the keys. Returns
    the weights file's fields other than the state dict.
    """
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != TORCHVISION_FORMAT:
        raise ValueError(f"{weights}: expected format {TORCHVISION_FORMAT!r}")
    if payload["arch"] != arch:
        raise ValueError(f"{weights}: arch is {payload['arch']!r}, the benchmark expects {arch!r}")
    provided = payload["state_dict"]
    expected = model.state_dict()
    required = {
        k for k in expected if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")
    }
    problems = [f"missing backbone key {k}" for k in sorted(required - set(provided))]
    problems += [f"unexpected key {k}" for k in sorted(set(provided) - set(expected))]
    problems += [
        f"{k}: shape {tuple(v.shape)}, the model has {tuple(expected[k].shape)}"
        for k, v in sorted(provided.items())
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ValueError(f"{weights}: cannot load into the detector:\n  " + "\n  ".join(problems))
    model.load_state_dict(provided, strict=False)
    return {k: v for k, v in payload.items() if k != "state_dict"}


def lr_at(solver: SolverSettings, iteration: int) -> float:
    """detectron2's WarmupMultiStepLR: linear warm-up from ``warmup_factor``, then decays."""
    warmup = 1.0
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        warmup = solver.warmup_factor * (1 - alpha) + alpha
    return solver.lr * warmup * solver.gamma ** bisect.bisect_right(solver.lr_steps, iteration)


def build_optimizer(model: nn.Module, solver: SolverSettings) -> torch.optim.SGD:
    """SGD over trainable parameters; norm-layer parameters get ``weight_decay_norm``."""
    norm_params, other_params = [], []
    for module in model.modules():
        group = norm_params if isinstance(module, NORM_MODULES) else other_params
        group += [p for p in module.parameters(recurse=False) if p.requires_grad]
    return torch.optim.SGD(
        [
            {"params": other_params, "weight_decay": solver.weight_decay},
            {"params": norm_params, "weight_decay": solver.weight_decay_norm},
        ],
        lr=lr_at(solver, 0),
        momentum=solver.momentum,
    )


def select_device(benchmark: BenchmarkSettings) -> torch.device:
    """``benchmark.device``: ``cpu``, ``cuda`` (an error without a GPU) or ``auto`` (cuda if any)."""
    return torch.device("cuda" if wants_cuda(benchmark.device, f"benchmark {benchmark.name!r}: device") else "cpu")


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, so that saved files load on machines without a GPU."""
    return {key: tensor.cpu() for key, tensor in model.state_dict().items()}


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(size).tolist())


def batch_indices(seed: int, iteration: int, batch_size: int, size: int) -> list[int]:
    """Dataset indices of one batch: consecutive positions in the seeded epoch permutations."""
    positions = range(iteration * batch_size, (iteration + 1) * batch_size)
    return [epoch_order(seed, p // size, size)[p % size] for p in positions]


def load_batch(
    data: CocoDetection, indices: list[int], flips: np.ndarray, device: torch.device
) -> tuple[list[torch.Tensor], list[dict]]:
    """Images and targets of ``indices``, flipped where ``flips`` says, on ``device``."""
    images, targets = [], []
    for index, flip in zip(indices, flips):
        image, target = data[index]
        if flip:
            image, target = hflip(image, target)
        images.append(image.to(device))
        targets.append({key: value.to(device) for key, value in target.items()})
    return images, targets


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict],
    iteration: int,
) -> float:
    """One SGD step on the sum of the detector's losses; returns the loss."""
    losses = model(images, targets)
    loss = sum(losses.values())
    if not math.isfinite(loss.item()):
        details = {k: round(v.item(), 4) for k, v in losses.items()}
        raise FloatingPointError(f"iteration {iteration}: non-finite loss {details}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def save_atomic(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume_state(path: Path, identity: dict) -> dict | None:
    """The workdir checkpoint if there is one; it must come from the same benchmark/seed/weights."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for field, value in identity.items():
        if state[field] != value:
            raise ValueError(
                f"{path}: checkpoint has {field}={state[field]!r}, this run has {value!r}; "
                "use another workdir or delete it"
            )
    return state


def finetune(
    benchmark: BenchmarkSettings, weights: Path | None, seed: int, out: Path, workdir: Path
) -> None:
    """Train the benchmark's detector from ``weights`` (``None``: random init) on
    ``benchmark.device`` and write ``out``.

    Resumes from ``workdir/checkpoint_last.pt`` when present; saves it every
    ``solver.checkpoint_every`` iterations.
    """
    solver = benchmark.solver
    device = select_device(benchmark)
    annotations = training_annotations(
        benchmark.dataset.path("train_json"), benchmark.train_fraction, benchmark.subset_seed, workdir
    )
    data = CocoDetection(annotations, benchmark.dataset.path("train_images"), with_masks=benchmark.with_masks)
    torch.manual_seed(seed)
    model = build_detector(benchmark, num_classes=len(data.category_ids))
    source = {"method": "random"}
    if weights is not None:
        source = load_pretrained_weights(model, weights, benchmark.arch)
    model.to(device)
    optimizer = build_optimizer(model, solver)

    checkpoint_path = Path(workdir) / CHECKPOINT_NAME
    identity = {"benchmark": benchmark.name, "seed": seed, "weights": str(weights or "none")}
    start = 0
    state = resume_state(checkpoint_path, identity)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]

    model.train()
    progress = tqdm(
        range(start, solver.iterations),
        initial=start,
        total=solver.iterations,
        desc=f"finetune {benchmark.name} seed {seed}",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for iteration in progress:
        rng = np.random.default_rng([seed, ITERATION_STREAM, iteration])
        torch.manual_seed(int(rng.integers(2**63)))
        flips = rng.random(solver.batch_size) < benchmark.input.hflip_prob
        indices = batch_indices(seed, iteration, solver.batch_size, len(data))
        images, targets = load_batch(data, indices, flips, device)
        lr = lr_at(solver, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, optimizer, images, targets, iteration)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        done = iteration + 1
        if done % solver.checkpoint_every == 0 or done == solver.iterations:
            save_atomic(
                checkpoint_path,
                {
                    **identity,
                    "iteration": done,
                    "model": cpu_state_dict(model),
                    "optimizer": optimizer.state_dict(),
                },
            )

    save_atomic(
        Path(out),
        {
            "format": DETECTOR_FORMAT,
            "benchmark": benchmark.name,
            "state_dict": cpu_state_dict(model),
            "seed": seed,
            "weights": identity["weights"],
            "method": source["method"],
            "category_ids": data.category_ids,
        },
    )
