"""A benchmark as detectron2 config options, without importing detectron2.

``detectron2_options`` gives the flat ``{"SOLVER.MAX_ITER": 90000, ...}`` overrides of
detectron2's ``get_cfg()`` defaults that build the benchmark's detector, data pipeline and
solver; ``detectron2_backend.build_cfg`` merges them into a ``CfgNode``. Keeping them a plain
dict lets the workflow and the tests check every protocol against the papers' numbers on
machines without detectron2.

Fixed for every benchmark, because our weights are torchvision ResNets on RGB 0..255 input
(MoCo's ``*_moco.yaml`` overrides, spec_dupr §4.1): ``INPUT.FORMAT RGB``,
``RESNETS.STRIDE_IN_1X1 False`` (torchvision strides in the 3x3 conv) and pixel statistics on the
0..255 scale (``InputSettings`` keeps them on 0..1).
"""

from __future__ import annotations

from typing import Any

from regioncl.archs import ARCHS
from regioncl.transfer.benchmarks import BenchmarkSettings

NORM_NAMES = {"bn": "BN", "syncbn": "SyncBN", "frozen_bn": "FrozenBN", "none": ""}
DEPTHS = {arch: int(arch.removeprefix("resnet")) for arch in ARCHS}  # RESNETS.DEPTH
SAMPLER_NAMES = {"uniform": "TrainingSampler", "repeat_factor": "RepeatFactorTrainingSampler"}
# Classes of the fixed-vocabulary formats; COCO-format data counts its categories instead.
FORMAT_NUM_CLASSES = {"voc": 20, "cityscapes": 8, "lvis": 1203}
FPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")  # RPN inputs; the RoI heads pool from p2..p5
RETINANET_LEVELS = ("p3", "p4", "p5", "p6", "p7")
C4_ANCHOR_SIZES = [[32, 64, 128, 256, 512]]  # one feature map (res4) holds every size
MASK_FORMATS = ("polygon", "bitmask")  # detectron2 INPUT.MASK_FORMAT


def dataset_names(benchmark: BenchmarkSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names under which the backend registers the benchmark's (train splits, test split)."""
    prefix = f"regioncl_{benchmark.name}"
    train = tuple(f"{prefix}_train{i}" for i in range(1 + len(benchmark.dataset.extra_train)))
    return train, (f"{prefix}_val",)


def _backbone_options(b: BenchmarkSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        # detectron2 FREEZE_AT k freezes the stem (1) and res2..res{k}; trainable_layers counts
        # finetuned stages from the top (5 = everything).
        "MODEL.BACKBONE.FREEZE_AT": 5 - b.trainable_layers,
        "MODEL.RESNETS.DEPTH": DEPTHS[b.arch],
        "MODEL.RESNETS.NORM": NORM_NAMES[b.norm],
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        # basic-block ResNets have 64 channels after res2; detectron2 requires saying so
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if DEPTHS[b.arch] < 50 else 256,
    }
    if not b.fpn:
        return options | {
            "MODEL.BACKBONE.NAME": "build_resnet_backbone",
            "MODEL.RESNETS.OUT_FEATURES": ["res4"],
            "MODEL.ANCHOR_GENERATOR.SIZES": C4_ANCHOR_SIZES,
        }
    retinanet = b.model == "retinanet"
    in_features = ["res3", "res4", "res5"] if retinanet else ["res2", "res3", "res4", "res5"]
    # RetinaNet: 3 scales per octave on P3..P7; R-CNN: one size per level P2..P6
    sizes = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in (32, 64, 128, 256, 512)] if retinanet else [
        [x] for x in (32, 64, 128, 256, 512)
    ]
    return options | {
        "MODEL.BACKBONE.NAME": "build_retinanet_resnet_fpn_backbone" if retinanet else "build_resnet_fpn_backbone",
        "MODEL.RESNETS.OUT_FEATURES": in_features,
        "MODEL.FPN.IN_FEATURES": in_features,
        "MODEL.FPN.OUT_CHANNELS": b.heads.fpn_channels,
        "MODEL.FPN.NORM": NORM_NAMES[b.fpn_norm],
        "MODEL.ANCHOR_GENERATOR.SIZES": sizes,
    }


def _rcnn_head_options(b: BenchmarkSettings, num_classes: int) -> dict[str, Any]:
    heads = b.heads
    options: dict[str, Any] = {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.MASK_ON": b.with_masks,
        "MODEL.RPN.IN_FEATURES": list(FPN_LEVELS) if b.fpn else ["res4"],
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": heads.rpn_batch_size_per_image,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": heads.rpn_pre_nms_top_n_train,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": heads.rpn_post_nms_top_n_train,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": heads.rpn_pre_nms_top_n_test,
        "MODEL.RPN.POST_NMS_TOPK_TEST": heads.rpn_post_nms_top_n_test,
        "MODEL.ROI_HEADS.NUM_CLASSES": num_classes,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": heads.roi_batch_size_per_image,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": b.eval.score_threshold,
    }
    if not b.fpn:
        # MoCo's Res5ROIHeadsExtraNorm (registered by detectron2_backend) adds a norm after res5
        name = "Res5ROIHeadsExtraNorm" if b.res5_extra_norm else "Res5ROIHeads"
        return options | {"MODEL.ROI_HEADS.NAME": name, "MODEL.ROI_HEADS.IN_FEATURES": ["res4"]}
    conv_head = b.box_head == "4conv1fc"
    options |= {
        "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_CONV": 4 if conv_head else 0,
        "MODEL.ROI_BOX_HEAD.CONV_DIM": heads.fpn_channels,
        "MODEL.ROI_BOX_HEAD.NUM_FC": 1 if conv_head else 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM": heads.box_head_dim,
        "MODEL.ROI_BOX_HEAD.NORM": NORM_NAMES[b.head_norm],
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    }
    if b.with_masks:
        options |= {
            "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
            "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
            "MODEL.ROI_MASK_HEAD.CONV_DIM": heads.mask_head_channels,
            "MODEL.ROI_MASK_HEAD.NORM": NORM_NAMES[b.head_norm],
            "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
        }
    return options


def _retinanet_options(b: BenchmarkSettings, num_classes: int) -> dict[str, Any]:
    # detectron2's Base-RetinaNet.yaml (spec_detco §4.2: IoU thresholds (0.4, 0.5), beta 0)
    return {
        "MODEL.META_ARCHITECTURE": "RetinaNet",
        "MODEL.MASK_ON": False,
        "MODEL.RETINANET.IN_FEATURES": list(RETINANET_LEVELS),
        "MODEL.RETINANET.NUM_CLASSES": num_classes,
        "MODEL.RETINANET.IOU_THRESHOLDS": [0.4, 0.5],
        "MODEL.RETINANET.IOU_LABELS": [0, -1, 1],
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.0,
        "MODEL.RETINANET.SCORE_THRESH_TEST": b.eval.score_threshold,
    }


def detectron2_options(
    b: BenchmarkSettings, num_classes: int, seed: int = 0, output_dir: str = "", mask_format: str = "polygon"
) -> dict[str, Any]:
    """The detectron2 config keys (dotted) and values that make up benchmark ``b``.

    ``mask_format`` is how the data's masks are carried: ``polygon`` (the papers' configs:
    COCO, LVIS and Cityscapes objects are polygons) or ``bitmask``, which also holds RLE masks
    (``detectron2_backend.mask_format_of`` picks it from the training annotations).
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes: expected > 0, got {num_classes!r}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format: expected one of {list(MASK_FORMATS)}, got {mask_format!r}")
    size, solver = b.input, b.solver
    train, test = dataset_names(b)
    head = _retinanet_options(b, num_classes) if b.model == "retinanet" else _rcnn_head_options(b, num_classes)
    return {
        **_backbone_options(b),
        **head,
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
        "MODEL.PIXEL_MEAN": [round(255 * v, 3) for v in size.pixel_mean],
        "MODEL.PIXEL_STD": [round(255 * v, 3) for v in size.pixel_std],
        "INPUT.FORMAT": "RGB",
        "INPUT.MIN_SIZE_TRAIN": list(size.min_size),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": size.min_size_sampling,
        "INPUT.MAX_SIZE_TRAIN": size.max_size,
        "INPUT.MIN_SIZE_TEST": size.eval_min_size,
        "INPUT.MAX_SIZE_TEST": size.eval_max_size,
        "INPUT.RANDOM_FLIP": "horizontal" if size.hflip_prob > 0 else "none",
        "INPUT.MASK_FORMAT": mask_format,
        "DATASETS.TRAIN": list(train),
        "DATASETS.TEST": list(test),
        "DATALOADER.SAMPLER_TRAIN": SAMPLER_NAMES[b.sampler],
        "DATALOADER.REPEAT_THRESHOLD": b.repeat_threshold,
        "SOLVER.IMS_PER_BATCH": solver.batch_size,
        "SOLVER.BASE_LR": solver.lr,
        "SOLVER.MOMENTUM": solver.momentum,
        "SOLVER.WEIGHT_DECAY": solver.weight_decay,
        "SOLVER.WEIGHT_DECAY_NORM": solver.weight_decay_norm,
        "SOLVER.MAX_ITER": solver.iterations,
        "SOLVER.STEPS": list(solver.lr_steps),
        "SOLVER.GAMMA": solver.gamma,
        "SOLVER.WARMUP_ITERS": solver.warmup_iters,
        "SOLVER.WARMUP_FACTOR": solver.warmup_factor,
        "SOLVER.WARMUP_METHOD": "linear",
        "SOLVER.CHECKPOINT_PERIOD": solver.checkpoint_every,
        "TEST.DETECTIONS_PER_IMAGE": b.eval.detections_per_image,
        "TEST.PRECISE_BN.ENABLED": b.precise_bn,
        "TEST.EVAL_PERIOD": 0,  # evaluated once, by the evaluate rule
        "SEED": seed,
        "OUTPUT_DIR": output_dir,
    }


def flat_option_list(options: dict[str, Any]) -> list[Any]:
    """``[key, value, key, value, ...]`` as ``CfgNode.merge_from_list`` takes them."""
    return [item for pair in options.items() for item in pair]
