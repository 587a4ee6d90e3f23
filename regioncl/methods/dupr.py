"""DUPR (Ding et al. 2021, "Unsupervised Pretraining for Object Detection by Patch Reidentification", arXiv 2103.04814).

MoCo v2 with an image-level loss at every stage and a dense patch re-identification loss:

    x1, x2 = T(x), T(x)                         two MoCo v2 crops; I = their intersection (source px)
    B_v = I in view v's pixels (flip-aware)     the pseudo object, located in each view
    v_m = avgpool f_m(x1) -> mlp_m, k_m likewise from the momentum encoder
    r_1^m = g_m(RoIAlign(f_m(x1), B_1, S_m x S_m)),  r_2^m from the momentum encoder     (eq. 3, 4)
      (the RoIAlign output of a flipped view is flipped back, so cell (i, j) is one source place in both)
    L = sum_m alpha_m L_g^m + sum_m beta_m L_p^m                                          (eq. 2)
      L_g^m = InfoNCE(v_m, k_m, image queue_m)                                            (eq. 6)
      L_p^m = InfoNCE over the S_m^2 cells: r_1,ij against r_2,ij, negatives from patch queue_m (eq. 5)
    alpha = (0.1, 0.4, 0.7, 1.0), beta = (0, 0, 1, 1), S = 14 on C4 and 7 on C5; 4 random key
    cells per image and level are enqueued in that level's patch queue.

The image-level part is the multi-level module DetCo uses (regioncl.models.multilevel, one
"global" branch). Choices where the paper is silent (spec_dupr.md; [P] paper, [X] DetCo, [R] MoCo
v2, [D] spec decision):
- Image heads [X/D]: Linear(C_m, 2048)-ReLU-Linear(2048, 128) per stage (``hidden_dim``; None:
  C_m). Pixel MLP g_m [D]: 1x1 conv C_m -> 2048 -> 128 (``patch_head_layers: 1``: a single 1x1
  conv, the other reading of "an MLP layer implemented by a 1x1 convolution").
- S [D]: 7 on C5 and 14 on C4 (two of the paper's three statements; ``roi_sizes``).
- RoIAlign [D]: aligned, sampling_ratio 2. Flips [D]: the grid of a flipped view is flipped back.
- Patch loss reduction [D]: the mean over cells and images (``patch_reduction: mean``); eq. 5's
  sum over cells is ``patch_reduction: sum`` (L_p times S^2).
- Non-intersecting crops [D]: the key crop is re-drawn up to ``max_redraws`` times until the
  crops overlap (by at least ``min_overlap`` view px per side in both views; default: any area);
  a pair that still does not is masked: no patch loss (masked mean over the global batch) and
  no patch enqueued. The image loss is unaffected.
- The 4 enqueued cells [D]: uniform without replacement, drawn in ``make_views``.
- tau 0.2 [P], K 65,536 per queue [P] (4 image + 2 patch queues), m 0.999 and shuffle-BN [R].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from regioncl.augment import MOCO_V2_RECIPE, augmented_view
from regioncl.geometry import View, crop_intersection, map_boxes, random_resized_crop
from regioncl.losses import info_nce
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import FeatureQueue, ResNetBackbone, make_target, shuffle_bn_encode
from regioncl.models.multilevel import STAGES, Contrast, MultiLevelContrast
from regioncl.models.roi import roi_align_boxes
from regioncl.settings import bounded


@dataclass(frozen=True)
class DuprParams:
    feature_dim: int = bounded(128, ge=1)
    hidden_dim: int | None = bounded(2048, ge=1)  # image heads; None: the stage's width C_m
    patch_hidden_dim: int = bounded(2048, ge=1)
    patch_head_layers: int = bounded(2, ge=1, le=2)  # 2: conv-ReLU-conv; 1: one 1x1 conv
    queue_size: int = bounded(65536, ge=1)  # per queue; the plan also checks it holds a global batch
    momentum: float = bounded(0.999, ge=0, le=1)
    temperature: float = bounded(0.2, gt=0)
    image_weights: tuple[float, float, float, float] = (0.1, 0.4, 0.7, 1.0)  # alpha, C2..C5
    patch_weights: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # beta, C2..C5 (0: no patch loss there)
    roi_sizes: tuple[int, int, int, int] = (56, 28, 14, 7)  # S per stage (only those with beta > 0 are used)
    patch_reduction: Literal["mean", "sum"] = "mean"
    enqueue_cells: int = bounded(4, ge=1)  # key cells per image and level into the patch queue
    crop_size: int = bounded(224, ge=1)  # view px of both crops
    crop_scale: tuple[float, float] = (0.2, 1.0)
    max_redraws: int = bounded(10, ge=0)  # key crops re-drawn for an intersection before masking
    min_overlap: float = bounded(0.0, ge=0)  # view px the intersection spans per side in both views
    sampling_ratio: int = 2  # RoIAlign samples per bin side (<= 0: adaptive)
    shuffle_bn: bool = True


def pixel_mlp(in_channels: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    """g_m: a per-position MLP of 1x1 convolutions, (B, C, S, S) -> (B, out, S, S)."""
    if layers == 1:
        return nn.Sequential(nn.Conv2d(in_channels, out, 1))
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out, 1))


@register_method("dupr")
class Dupr(PretrainMethod):
    Params = DuprParams
    pixel_params = ("crop_size",)

    def __init__(self, params: DuprParams, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self.backbone = ResNetBackbone(arch)
        self.backbone_k = make_target(self.backbone)
        widths = self.backbone.stage_channels
        self.contrast = MultiLevelContrast(
            {"global": dict(widths)},
            hidden_dims={"global": params.hidden_dim},
            feature_dim=params.feature_dim,
            queue_size=params.queue_size,
            temperature=params.temperature,
            weights=dict(zip(STAGES, params.image_weights, strict=True)),
            contrasts=[Contrast("image", "global", "global")],
        )
        self.patch_weights = {s: w for s, w in zip(STAGES, params.patch_weights, strict=True) if w > 0}
        self.roi_sizes = {s: size for s, size in zip(STAGES, params.roi_sizes, strict=True) if s in self.patch_weights}
        for stage, size in self.roi_sizes.items():
            if size < 1 or params.enqueue_cells > size * size:
                raise ValueError(
                    f"dupr: roi_sizes at {stage} is {size}; expected >= 1 with enqueue_cells {params.enqueue_cells} <= S*S"
                )
        self.patch_heads = nn.ModuleDict(
            {
                s: pixel_mlp(widths[s], params.patch_hidden_dim, params.feature_dim, params.patch_head_layers)
                for s in self.roi_sizes
            }
        )
        self.patch_heads_k = make_target(self.patch_heads)
        self.patch_queues = nn.ModuleDict({s: FeatureQueue(params.queue_size, params.feature_dim) for s in self.roi_sizes})

    def pair_geometry(self, width: int, height: int, rng: np.random.Generator) -> tuple[View, View, np.ndarray | None]:
        """Two crops and their intersection (x1y1x2y2 source px), the key crop re-drawn until they
        overlap by ``min_overlap`` view px per side; None when ``max_redraws`` re-draws did not."""
        p = self.params
        query = random_resized_crop(width, height, p.crop_size, rng, scale=p.crop_scale)
        source = View.identity(width, height)
        for _ in range(p.max_redraws + 1):
            key = random_resized_crop(width, height, p.crop_size, rng, scale=p.crop_scale)
            overlap = crop_intersection(query, key)
            if overlap is not None:
                box = np.asarray(overlap, dtype=np.float64)[None]
                sides = [map_boxes(box, source, view)[0] for view in (query, key)]
                if min(min(b[2] - b[0], b[3] - b[1]) for b in sides) >= p.min_overlap:
                    return query, key, box[0]
        return query, key, None

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """"query", "key" (3, S, S); "box_query", "box_key" (4,) the intersection, x1y1x2y2 view px;
        "flip_query", "flip_key", "valid" () bool; "cells_<stage>" (enqueue_cells,) key-grid cells to enqueue."""
        image = sample["image"]
        width, height = image.size
        query, key, overlap = self.pair_geometry(width, height, rng)
        source = View.identity(width, height)
        views: dict[str, torch.Tensor] = {"valid": torch.tensor(overlap is not None)}
        for name, view in (("query", query), ("key", key)):
            views |= augmented_view(name, image, view, MOCO_V2_RECIPE, rng)
            # Without an intersection any finite box will do: its cells are masked.
            box = map_boxes(overlap, source, view)[0] if overlap is not None else np.array([0.0, 0.0, view.out_w, view.out_h])
            views[f"box_{name}"] = torch.from_numpy(box).float()
            views[f"flip_{name}"] = torch.tensor(view.flip)
        for stage, size in self.roi_sizes.items():
            views[f"cells_{stage}"] = torch.from_numpy(rng.choice(size * size, self.params.enqueue_cells, replace=False))
        return views

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_k), *self.contrast.momentum_pairs(), (self.patch_heads, self.patch_heads_k)]

    def momentum_at(self, step_info: StepInfo) -> float:
        return self.params.momentum

    def patch_grid(
        self, features: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, stride: int
    ) -> torch.Tensor:
        """RoIAlign over each image's box, flipped back: (B, C, H, W) + (B, 4) view px + (B,) bool -> (B, C, S, S).

        Cell (i, j) is row i, column j of the box in source orientation (column 0 at the source's left).
        """
        grid = roi_align_boxes(features, boxes[:, None], size, stride, sampling_ratio=self.params.sampling_ratio)[:, 0]
        return torch.where(flips[:, None, None, None], grid.flip(-1), grid)

    def _patches(
        self, heads: nn.ModuleDict, maps: dict[str, torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """stage -> (B, S, S, D) L2-normalized patch embeddings."""
        out = {}
        for stage, size in self.roi_sizes.items():
            grid = self.patch_grid(maps[stage], boxes, flips, size, 2 ** int(stage[1:]))
            out[stage] = F.normalize(heads[stage](grid), dim=1).permute(0, 2, 3, 1)
        return out

    def _encode_keys(self, inputs: dict[str, Any]) -> dict[str, Any]:
        maps = self.backbone_k.forward_stages(inputs["key"])
        patches = self._patches(self.patch_heads_k, maps, inputs["box"], inputs["flip"] > 0.5)
        sampled = {  # (B, enqueue_cells, D): the drawn cells of each image's key grid
            s: torch.gather(r.flatten(1, 2), 1, inputs["cells"][s][..., None].expand(-1, -1, r.shape[-1]))
            for s, r in patches.items()
        }
        image = self.contrast.keys({"global": {s: f.mean(dim=(2, 3)) for s, f in maps.items()}})
        return {"image": image, "patch": patches, "sampled": sampled, "valid": inputs["valid"]}

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        maps = self.backbone.forward_stages(batch["query"])
        queries = self.contrast.queries({"global": {s: f.mean(dim=(2, 3)) for s, f in maps.items()}})
        patch_q = self._patches(self.patch_heads, maps, batch["box_query"], batch["flip_query"])
        inputs = {  # per-image rows, shuffled with their images; flags as floats for the all-gathers
            "key": batch["key"], "box": batch["box_key"], "flip": batch["flip_key"].float(), "valid": batch["valid"].float(),
            "cells": {s: batch[f"cells_{s}"] for s in self.roi_sizes},
        }
        keys, everyone = shuffle_bn_encode(  # this rank's keys (first dim B), all ranks' (world * B); no gradient
            self._encode_keys, inputs, seed=step_info.seed, step=step_info.step, enabled=self.params.shuffle_bn
        )
        losses = self.contrast.loss(queries, keys["image"])
        for stage, weight in self.patch_weights.items():
            size = self.roi_sizes[stage]
            mask = batch["valid"][:, None, None].expand(-1, size, size)  # (B, S, S): no patch loss without an intersection
            negatives = self.patch_queues[stage].features.clone()  # a copy: the enqueue below writes the buffer
            patch = info_nce(patch_q[stage], keys["patch"][stage], negatives, self.params.temperature, mask=mask)
            losses[f"loss_patch_{stage}"] = weight * patch * (size * size if self.params.patch_reduction == "sum" else 1)
        losses["loss"] = sum(value for name, value in losses.items() if name != "loss")
        self.contrast.enqueue(everyone["image"])
        kept = everyone["valid"] > 0.5  # (world * B,): pairs that intersect
        for stage, queue in self.patch_queues.items():
            queue.enqueue(everyone["sampled"][stage][kept].flatten(0, 1))
        return losses
