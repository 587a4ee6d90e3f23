"""Finetune torchvision's Faster / Mask R-CNN and RetinaNet (ResNet-FPN) from converted weights,
and evaluate them (``evaluate``: COCO AP by ``regioncl.transfer.torchvision_eval``).

Runs on ``benchmark.device`` (``auto``: the GPU when there is one); checkpoints and the
finetuned detector are loadable on the CPU.

Determinism and exact resume: the data order of epoch ``e`` is a permutation drawn from
``(seed, e)``; the flips and torch's global RNG (RPN / RoI sampling, multi-scale resize) are
re-seeded from ``(seed, iteration)`` at every iteration. So a resumed run needs only the
model and optimizer state to continue exactly as an uninterrupted one (on the CPU of the same
machine, same thread count; on a GPU only up to the nondeterminism of CUDA kernels such as
RoIAlign's backward), and the learning rate is a pure function of the iteration.

Checkpoints live in ``workdir/<identity key>`` (``regioncl.transfer.identity``): other settings
or other weights bytes start afresh there. The iteration count may change between a run and its
resume (``RESUME_MAY_CHANGE``): a longer run continues a shorter one exactly, since nothing
above depends on the total; a checkpoint past the new end is not resumed.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import sys
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from regioncl.convert import has_fpn_norm, module_of, select_modules
from regioncl.curves import MetricsLog
from regioncl.device import one_thread_per_worker, wants_cuda
from regioncl.io import atomic_path
from regioncl.progress import Progress
from regioncl.transfer.benchmarks import BenchmarkSettings, SolverSettings
from regioncl.transfer.coco_data import CocoDetection, hflip
from regioncl.transfer.identity import finetune_identity
from regioncl.transfer.loading import check_loadable, load_problems, report_left_out, shapes_of
from regioncl.transfer.records import load_finetuned_detector, write_metrics_record
from regioncl.transfer.subsets import training_annotations
from regioncl.transfer.torchvision_eval import coco_metrics, predict
from regioncl.weights import check_same_run, read_torchvision_weights

DETECTOR_FORMAT = "regioncl.detector/1"
CHECKPOINT_NAME = "checkpoint_last.pt"
ORDER_STREAM, ITERATION_STREAM = 0, 1  # independent random streams derived from the seed
# Settings a checkpoint may be resumed across without changing the result (see the docstring).
RESUME_MAY_CHANGE = ("device", "solver.iterations", "solver.checkpoint_every")
# A hook after each finetuning step: (iterations done, the model, that step's losses).
AfterStep = Callable[[int, nn.Module, dict[str, float]], None]

# 'syncbn' builds BatchNorm2d and converts it: SyncBatchNorm behaves as BatchNorm2d unless a
# process group is initialised, so one code path serves one CPU process and many GPUs.
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "syncbn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
}
# Norms after the FPN's and the heads' convs (``fpn_norm``, ``head_norm``; None: a conv bias instead).
EXTRA_NORM_LAYERS: dict[str, type[nn.Module] | None] = {"none": None, "bn": nn.BatchNorm2d, "syncbn": nn.BatchNorm2d}
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
        norm_layer=EXTRA_NORM_LAYERS[benchmark.fpn_norm],
    )
    if benchmark.norm == "syncbn":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    elif benchmark.fpn_norm == "syncbn":
        backbone.fpn = nn.SyncBatchNorm.convert_sync_batchnorm(backbone.fpn)
    return backbone


def synced_head(head: nn.Module, norm: str) -> nn.Module:
    """A head with ``head_norm`` 'syncbn': its BatchNorm2d layers synchronised (as ``build_backbone``'s)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(head) if norm == "syncbn" else head


def build_faster_rcnn(benchmark: BenchmarkSettings, num_classes: int) -> FasterRCNN:
    return FasterRCNN(num_classes=None, **detector_parts(benchmark, num_classes))


def build_mask_rcnn(benchmark: BenchmarkSettings, num_classes: int) -> MaskRCNN:
    parts = detector_parts(benchmark, num_classes)
    channels = benchmark.heads.mask_head_channels
    norm = EXTRA_NORM_LAYERS[benchmark.head_norm]
    mask_head = synced_head(MaskRCNNHeads(parts["backbone"].out_channels, (channels,) * 4, 1, norm_layer=norm), benchmark.head_norm)
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
    if benchmark.box_head == "4conv1fc":  # detectron2's FastRCNNConvFCHead(NUM_CONV 4, CONV_DIM = FPN width, NUM_FC 1)
        channels, norm = backbone.out_channels, EXTRA_NORM_LAYERS[benchmark.head_norm]
        head = FastRCNNConvFCHead((channels, box_pool_size, box_pool_size), [channels] * 4, [heads.box_head_dim], norm_layer=norm)
        box_head = synced_head(head, benchmark.head_norm)
    else:
        box_head = TwoMLPHead(backbone.out_channels * box_pool_size**2, heads.box_head_dim)
    return {
        "backbone": backbone,
        "box_head": box_head,
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


def load_pretrained_weights(
    model: nn.Module, weights: Path, arch: str, *, modules: Collection[str] = ("backbone", "fpn", "box_head")
) -> dict:
    """Load converted torchvision weights (``regioncl.torchvision/1``) into ``model``.

    ``modules``: the pretrained modules the detector takes (``BenchmarkSettings.pretrained_modules``);
    the weights' tensors of other modules are left out and named in the returned ``left_out``,
    and so is an FPN with a norm after its convs when the detector's has none, or the reverse
    (convs trained before a norm do not fit an FPN without one). An FPN indexed from C2
    (regioncl's) is re-indexed for a detector whose FPN starts at C3 (RetinaNet), its C2 blocks
    left out. Every backbone tensor of the model (BatchNorm counters aside) must be provided, and
    every tensor loaded must exist with the same shape; an FPN of another width than the
    detector's (its pretraining run's ``fpn_channels``) is named as such. Otherwise raise naming
    the keys. Returns the weights file's fields other than the state dict, and ``left_out``.
    """
    payload = read_torchvision_weights(weights, arch, "the benchmark")
    provided, left_out = select_modules(payload["state_dict"], "torchvision", modules)
    first_level = 1 + min(int(name.removeprefix("layer")) for name in model.backbone.body.return_layers)
    provided, fpn_left_out = _fpn_from_level(provided, first_level)
    expected = model.state_dict()
    if has_fpn_norm(provided, "torchvision") != has_fpn_norm(expected, "torchvision"):
        provided, unfit = select_modules(provided, "torchvision", set(modules) - {"fpn"})
        fpn_left_out += unfit
    required = [k for k in expected if k.startswith("backbone.body.") and not k.endswith("num_batches_tracked")]
    problems = load_problems(shapes_of(provided), shapes_of(expected), required)
    check_loadable(weights, _fpn_problems(provided, expected) + problems)
    model.load_state_dict(provided, strict=False)
    return {**{k: v for k, v in payload.items() if k != "state_dict"}, "left_out": left_out + fpn_left_out}


FPN_BLOCK = re.compile(r"backbone\.fpn\.(?P<kind>inner|layer)_blocks\.(?P<index>\d+)\.(?P<rest>.+)")


def _fpn_from_level(state: dict[str, torch.Tensor], first_level: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """FPN blocks indexed from C2 (``regioncl.models.FPN``) re-indexed for an FPN whose first input
    is C``first_level``: (the state, the keys of the levels below it, left out)."""
    shift = first_level - 2
    renamed, dropped = {}, []
    for key, tensor in state.items():
        match = FPN_BLOCK.fullmatch(key)
        if match is None or shift == 0:
            renamed[key] = tensor
        elif int(match["index"]) < shift:
            dropped.append(key)
        else:
            renamed[f"backbone.fpn.{match['kind']}_blocks.{int(match['index']) - shift}.{match['rest']}"] = tensor
    return renamed, dropped


def _fpn_problems(provided: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """The pretrained FPN's width (its run's ``fpn_channels``) against the detector's, in words."""
    mine = [k for k in provided if module_of(k, "torchvision") == "fpn" and k.endswith(".0.weight")]
    if not mine:
        return []
    width, detector_width = provided[mine[0]].shape[0], expected["backbone.fpn.layer_blocks.0.0.weight"].shape[0]
    if width == detector_width:
        return []
    return [
        f"FPN width: the pretrained FPN has {width} channels (its pretraining run's fpn_channels), this "
        f"detector's {detector_width} (heads.fpn_channels); set heads.fpn_channels: {width}, or leave the "
        "FPN out of the benchmark's transfer"
    ]


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


def iteration_draws(seed: int, iteration: int, batch_size: int, hflip_prob: float) -> tuple[int, np.ndarray]:
    """The random draws of one iteration, from its own stream: the torch seed of the step (the
    detector's sampling of anchors and RoIs) and which images of the batch are flipped."""
    rng = np.random.default_rng([seed, ITERATION_STREAM, iteration])
    torch_seed = int(rng.integers(2**63))
    return torch_seed, rng.random(batch_size) < hflip_prob


class IterationBatches(torch.utils.data.Dataset):
    """Item ``i``: the images and targets of iteration ``first + i``, decoded and flipped on the
    CPU. A pure function of (seed, iteration), so loader workers (any number) or none give the
    same batches, and a resumed run the batches an uninterrupted one would have had."""

    def __init__(self, data: CocoDetection, seed: int, batch_size: int, hflip_prob: float, first: int, last: int) -> None:
        self.data, self.seed, self.batch_size, self.hflip_prob = data, seed, batch_size, hflip_prob
        self.first, self.last = first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, item: int) -> tuple[list[torch.Tensor], list[dict]]:
        iteration = self.first + item
        _, flips = iteration_draws(self.seed, iteration, self.batch_size, self.hflip_prob)
        images, targets = [], []
        for index, flip in zip(batch_indices(self.seed, iteration, self.batch_size, len(self.data)), flips, strict=True):
            image, target = self.data[index]
            if flip:
                image, target = hflip(image, target)
            images.append(image)
            targets.append(target)
        return images, targets


def iteration_loader(batches: IterationBatches, num_workers: int) -> torch.utils.data.DataLoader:
    """``batches`` in order, decoded by ``num_workers`` processes (0: in this one), each keeping
    two iterations in flight; one torch thread per worker, so they do not fight the model for cores."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=one_thread_per_worker if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(0),  # not the global torch RNG the steps reseed
    )


def _on_device(images: list[torch.Tensor], targets: list[dict], device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    return [image.to(device) for image in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict],
    iteration: int,
) -> dict[str, float]:
    """One SGD step on the sum of the detector's losses; returns ``loss`` (the sum) and each term."""
    losses = model(images, targets)
    loss = sum(losses.values())
    if not math.isfinite(loss.item()):
        details = {k: round(v.item(), 4) for k, v in losses.items()}
        raise FloatingPointError(f"iteration {iteration}: non-finite loss {details}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), **{name: value.item() for name, value in losses.items()}}


def save_atomic(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume_state(path: Path, identity_key: str, iterations: int) -> dict | None:
    """The checkpoint at ``path`` if there is one to resume: of this identity (else an error:
    it was put there by hand), and not past ``iterations`` (else None, with a message)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_same_run(path, {"identity": state.get("identity")}, {"identity": identity_key})
    if state["iteration"] > iterations:
        print(f"{path}: at iteration {state['iteration']}, past this run's {iterations}; starting afresh", file=sys.stderr)
        return None
    return state


def train_iterations(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    solver: SolverSettings,
    identity_key: str,
    workdir: Path,
    desc: str,
    batches_from: Callable[[int], Iterable[Any]],
    prepare: Callable[[int, Any], tuple[Any, Any]],
    after_step: AfterStep | None = None,
) -> MetricsLog:
    """The finetuning loop of every torchvision-backend task: resume from ``workdir``'s
    checkpoint of ``identity_key`` (saying so on stderr), then for each remaining iteration set
    the lr, take ``train_step`` on ``prepare(iteration, batch)`` (model inputs and targets, on
    the device) of the batches ``batches_from(start)`` yields, log and show progress, and save
    the checkpoint every ``solver.checkpoint_every`` iterations and at the end. Returns the log.

    ``after_step(done, model, losses)``, when given, runs after each step and its checkpoint
    (``done``: iterations taken so far); it may evaluate the model, which is put back in train
    mode after it. It is how a measurement looks inside one schedule (benchmarks/finetune_curve.py)
    without a second copy of this loop."""
    checkpoint_path = workdir / CHECKPOINT_NAME
    start = 0
    state = resume_state(checkpoint_path, identity_key, solver.iterations)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
        print(f"{desc}: resuming from iteration {start} ({checkpoint_path})", file=sys.stderr)

    model.train()
    log = MetricsLog(workdir / "metrics.jsonl", start)
    progress = Progress(solver.iterations, initial=start, desc=desc)
    for iteration, batch in enumerate(batches_from(start), start=start):
        inputs, targets = prepare(iteration, batch)
        lr = lr_at(solver, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = train_step(model, optimizer, inputs, targets, iteration)
        done = iteration + 1
        log.append({"step": done, "lr": lr, **losses})
        progress.update(done, loss=losses["loss"], lr=lr)
        if done % solver.checkpoint_every == 0 or done == solver.iterations:
            save_atomic(
                checkpoint_path,
                {"identity": identity_key, "iteration": done, "model": cpu_state_dict(model), "optimizer": optimizer.state_dict()},
            )
        if after_step is not None:
            after_step(done, model, losses)
            model.train()
    progress.close()
    return log


def publish_finetuned(
    out: Path,
    metrics: Path | None,
    log: MetricsLog,
    model: nn.Module,
    format_tag: str,
    benchmark: BenchmarkSettings,
    seed: int,
    identity: dict,
    method: str,
    **labels: Any,
) -> None:
    """A finished finetune's outputs: ``metrics`` (the per-iteration log) when asked for, then
    ``out``, the trained model with what ``records.load_finetuned_detector`` checks on loading
    (format, benchmark) and the record reports (seed, weights, method), plus the task's
    ``labels`` (the detector's category ids, the FCN's class names)."""
    if metrics is not None:
        log.publish(Path(metrics))
    save_atomic(
        Path(out),
        {
            "format": format_tag,
            "benchmark": benchmark.name,
            "state_dict": cpu_state_dict(model),
            "seed": seed,
            "weights": identity["weights"],
            "method": method,
            **labels,
        },
    )


def finetune(
    benchmark: BenchmarkSettings,
    weights: Path | None,
    seed: int,
    out: Path,
    workdir: Path,
    *,
    metrics: Path | None = None,
    num_workers: int = 0,
    after_step: AfterStep | None = None,
) -> None:
    """Train the benchmark's detector from ``weights`` (``None``: random init) on
    ``benchmark.device`` and write ``out`` (and ``metrics``: per-iteration losses and lr).
    ``num_workers`` processes decode and flip the next batches meanwhile (0: this process does,
    between steps); the result does not depend on it. ``after_step``: see ``train_iterations``.

    Resumes from ``workdir/<identity key>/checkpoint_last.pt`` when present, saying so on
    stderr; saves it every ``solver.checkpoint_every`` iterations.
    """
    solver = benchmark.solver
    device = select_device(benchmark)
    identity = finetune_identity(benchmark, seed, weights, RESUME_MAY_CHANGE)
    workdir = Path(workdir) / identity["key"]
    annotations = training_annotations(
        benchmark.dataset.path("train_json"), benchmark.train_fraction, benchmark.subset_seed, workdir
    )
    data = CocoDetection(annotations, benchmark.dataset.path("train_images"), with_masks=benchmark.with_masks)
    torch.manual_seed(seed)
    model = build_detector(benchmark, num_classes=len(data.category_ids))
    source = {"method": "random"}
    if weights is not None:
        source = load_pretrained_weights(model, weights, benchmark.arch, modules=benchmark.pretrained_modules)
        report_left_out(weights, benchmark.name, source["left_out"], "torchvision")
    model.to(device)
    optimizer = build_optimizer(model, solver)

    batches = functools.partial(IterationBatches, data, seed, solver.batch_size, benchmark.input.hflip_prob)

    def prepare(iteration: int, batch: tuple[list[torch.Tensor], list[dict]]) -> tuple[list[torch.Tensor], list[dict]]:
        torch_seed, _ = iteration_draws(seed, iteration, solver.batch_size, benchmark.input.hflip_prob)
        torch.manual_seed(torch_seed)  # the detector's own sampling (RPN / RoI) in this step
        return _on_device(*batch, device)

    log = train_iterations(
        model, optimizer, solver, identity["key"], workdir, f"finetune {benchmark.name} seed {seed}",
        lambda start: iteration_loader(batches(start, solver.iterations), num_workers), prepare, after_step,
    )
    publish_finetuned(
        out, metrics, log, model, DETECTOR_FORMAT, benchmark, seed, identity, source["method"],
        category_ids=data.category_ids,
    )


def load_detector(benchmark: BenchmarkSettings, model_path: Path) -> tuple[torch.nn.Module, dict]:
    saved = load_finetuned_detector(model_path, DETECTOR_FORMAT, benchmark)
    model = build_detector(benchmark, num_classes=len(saved["category_ids"]))
    model.load_state_dict(saved["state_dict"])
    return model, saved


def evaluate(
    benchmark: BenchmarkSettings,
    model_path: Path,
    out: Path,
    *,
    run: str | None = None,
    method: str | None = None,
) -> dict:
    """Run the detector on the benchmark's val split (on ``benchmark.device``), score it, write
    and return the record.

    ``run`` and ``method`` label the record for the tables; ``method`` defaults to the one the
    detector's weights came from ("random" without pretraining).
    """
    device = select_device(benchmark)
    model, saved = load_detector(benchmark, model_path)
    gt_json = benchmark.dataset.path("val_json")
    data = CocoDetection(gt_json, benchmark.dataset.path("val_images"), with_masks=False)
    if data.category_ids != saved["category_ids"]:
        raise ValueError(
            f"{gt_json}: categories {data.category_ids} differ from those the model was "
            f"trained on {saved['category_ids']}"
        )
    detections = predict(model.to(device), data, benchmark.eval.batch_size, device)
    metrics = {t: coco_metrics(gt_json, detections, t) for t in benchmark.iou_types}
    return write_metrics_record(
        out, benchmark, model_path, saved, metrics, run=run, method=method,
        versions={"torchvision": torchvision.__version__},
    )
