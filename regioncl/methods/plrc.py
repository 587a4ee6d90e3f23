"""PLRC (Bai et al. 2022, "Point-Level Region Contrast for Object Detection Pre-Training", arXiv 2202.04639).

MoCo v2 (asymmetric) plus two point-level losses on a grid of source regions:

    v, v'          two MoCo v2 crops; the source image cut into an n x n grid of regions (n = 4)
    a view's label map: the region of each pixel centre of an R x R map of the view (R = 56)
    N regions (labels present in both maps, drawn with repetition), P points per region and view,
    drawn uniformly with repetition among the region's pixels of that view's map (N = P = 16)
    F = g(f(v)), F' = g'(f'(v'))   the MoCo v2 MLP as 1x1 convs on res5: (B, 128, 7, 7)
    p_i = F at query point i, p'_k = F' at key point k, p'_i = F' at query point i mapped into v';
    all bilinear (the 7 x 7 map upsampled to R x R), L2-normalized
    L_m = InfoNCE(z, z', queue, 0.2),  z = g(GAP f(v)) / ||.||                       (eq. 1)
    L_c = point_contrast: positives a_i = a_k in the same image, denominator every key point  (eq. 2)
    L_a = affinity_distillation: teacher A_{i'k'}(tau_t = 0.07), student A_{ik'}(tau_s = 0.1)  (eq. 3-4)
    L   = beta (alpha L_c + (1 - alpha) L_a) + (1 - beta) L_m,  alpha = 0.5, beta = 0.7  (eq. 5-6)
    L_a = 0 (no gradient, key kept) for the first ``distill_warmup_epochs`` = 30 epochs [P sec. 4.1]

Losses are ``regioncl.losses.point_contrast`` and ``affinity_distillation``; the image loss is
``info_nce``. Every random draw (crops, regions, points, photometric) happens in ``make_views``,
in this order: the query crop, the key crop, the N regions, the query points, the key points,
the query's then the key's photometric recipe. ``forward`` draws nothing.

Choices ([P] paper, [C] released code facebookresearch/PLRC, [R] MoCo v2, [D] spec decision;
spec_plrc.md sections 2 and 9):
- Regions [P][D]: the grid is over the whole source image (``grid_cells``); a view's label map
  takes the region of each R x R pixel centre mapped to the source (nearest, flips included).
  Valid regions are the labels present in both maps; N are drawn with repetition and shared by
  both views [D]; a region drawn twice is one region (its points are positives of each other). An
  image without a common label has no point loss (``regions_valid`` False) [P sec. 4.1]. No
  overlap constraint on the crops [P] ([C] redraws partner crops to >= 50 % overlap).
- Points [D]: pixel centres of the R x R map, uniform with repetition within the region; stored in
  view px (``points_query``, ``points_key``). R = 56 [P Tab. 3f, C] (sec. 4.1 prints 64), scaled with
  ``crop_size`` (a ``pixel_params`` field). Features: ``grid_sample`` of the 7 x 7 head output,
  bilinear, align_corners False, border padding, which at a pixel centre of the R x R map is exactly
  the bilinear upsampling to R x R (``F.interpolate``, align_corners False) read there; at the
  teacher's mapped points (not on pixel centres) it is the bilinear value of the 7 x 7 map itself.
  [C]'s (row, col)-as-(x, y) transposition is not reproduced.
- Teacher points p'_i [D]: the query points mapped into v' (``points_query_in_key``), sampled on
  the momentum map of v'; no extra forward. Points outside v' are dropped from L_a
  (``distill_mask``). ([C]: an extra partner crop through the momentum encoder and PixPro-style bin
  matching; not implemented.)
- tau of L_c [D][C]: ``point_temperature`` 0.2 (alternative 0.1 = tau_s). Normalizer C [D]: the
  positive pairs of the image; L_c and L_a are means per image, then over images.
- Contrast set [D]: ``point_negatives: global``, the key points of every image of the global batch
  (all-gathered, fixed size N P per image; images without a common region masked out), no point
  queue. ``local`` [C]: this rank's key points only (then 1 and W processes differ by design).
  Positive pairs are cross-view only (query anchor, key positives) [P]; [C]'s SupCon over
  query-query and key-key pairs and its single common region per image are not reproduced.
- Image embedding: ``image_embedding: pooled`` [D][R] z = g(GAP res5), the MoCo v2 head on the
  pooled feature (the same weights as the 1 x 1 convs); ``dense_mean`` [C] the mean of the
  per-location projections.
- Warm-up [P]: L_a off for ``distill_warmup_epochs`` (30), in epochs of this run; ([C] instead
  anneals a DINO teacher temperature 0.04 -> 0.07 from epoch 0 with centering: not implemented, nor
  [C]'s 4096-prototype head). The switch reads ``StepInfo.epoch``, so a resumed run switches at the
  same step.
- Loss weights [P]: 0.35 L_c + 0.35 L_a + 0.30 L_m ([C]'s swapped unpacking gives other weights).
- Image loss target 0 [R] ([C]'s arange target is a bug); flip probability 0.5 [R] ([C] 0.25).
- Memory: ``chunk_size`` rows of the (B N P, world B N P) similarity matrices at a time, each chunk
  under activation checkpointing (None: all at once). The point losses run in float32 under autocast.
  docs/pretraining.md states the paper-scale peak.

``transfer_state``: the ResNet (the heads are dropped, as [C]'s converter does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from regioncl.augment import MOCO_V2_RECIPE, augmented_view
from regioncl.geometry import View, cell_index, map_points, points_inside, random_resized_crop
from regioncl.losses import affinity_distillation, info_nce, point_contrast
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import FeatureQueue, MLPHead, ResNetBackbone, gather, make_target, shuffle_bn_encode
from regioncl.settings import bounded


@dataclass(frozen=True)
class PlrcParams:
    crop_size: int = bounded(224, ge=1)  # view px of both crops [R]
    crop_scale: tuple[float, float] = (0.2, 1.0)  # [R]
    grid: int = bounded(4, ge=1)  # n: n x n source regions [P]
    num_regions: int = bounded(16, ge=1)  # N per image, with repetition [P]
    num_points: int = bounded(16, ge=1)  # P per region and view [P]
    resolution: int = bounded(56, ge=1)  # R: the label map / upsampled feature map, px per side [P Tab. 3f]
    feature_dim: int = bounded(128, ge=1)  # [R]
    hidden_dim: int | None = bounded(None, ge=1)  # None: the backbone's width (2048 for R50) [R]
    image_embedding: Literal["pooled", "dense_mean"] = "pooled"
    point_negatives: Literal["global", "local"] = "global"
    point_temperature: float = bounded(0.2, gt=0)  # tau of L_c [D]
    student_temperature: float = bounded(0.1, gt=0)  # tau_s [P]
    teacher_temperature: float = bounded(0.07, gt=0)  # tau_t [P]
    distill_warmup_epochs: int = bounded(30, ge=0)  # L_a off before this epoch [P]
    alpha: float = bounded(0.5, ge=0, le=1)  # L_c vs L_a (eq. 5) [P]
    beta: float = bounded(0.7, ge=0, le=1)  # point vs image losses (eq. 6) [P]
    queue_size: int = bounded(65536, ge=1)  # [R]
    momentum: float = bounded(0.999, ge=0, le=1)  # [R]
    temperature: float = bounded(0.2, gt=0)  # tau of L_m [R]
    shuffle_bn: bool = True  # [R]
    chunk_size: int | None = bounded(None, ge=1)  # rows of the point similarity matrices per chunk


@dataclass(frozen=True)
class PointGeometry:
    """One sample's crops, regions and points (float64, view px)."""

    query: View
    key: View
    regions: np.ndarray  # (N,) int64 region labels r * n + c of the source grid (0 when not valid)
    valid: bool  # some region is present in both views
    points_query: np.ndarray  # (N * P, 2) x, y in query px; point j belongs to regions[j // P]
    points_key: np.ndarray  # (N * P, 2) x, y in key px
    points_query_in_key: np.ndarray  # (N * P, 2) the query points mapped into key px
    distill_mask: np.ndarray  # (N * P,) bool: valid and the query point lies inside the key view


@register_method("plrc")
class Plrc(PretrainMethod):
    Params = PlrcParams
    pixel_params = ("crop_size", "resolution")

    def __init__(self, params: PlrcParams, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self.backbone = ResNetBackbone(arch)
        width = self.backbone.out_channels
        self.head = MLPHead(width, params.hidden_dim or width, params.feature_dim)  # per location: 1x1 convs
        self.backbone_k = make_target(self.backbone)
        self.head_k = make_target(self.head)
        self.queue = FeatureQueue(params.queue_size, params.feature_dim)

    # -- views ------------------------------------------------------------------------------

    def label_map(self, view: View, source: View) -> np.ndarray:
        """(R * R,) int64 region label of each pixel centre of ``view``'s R x R map, row-major."""
        fine = view.resized(self.params.resolution)
        return cell_index(map_points(self.pixel_centres(), fine, source), source.crop, self.params.grid)

    def pixel_centres(self) -> np.ndarray:
        """(R * R, 2) x, y pixel centres of an R x R map, row-major (y outer)."""
        side = self.params.resolution
        ys, xs = np.meshgrid(np.arange(side) + 0.5, np.arange(side) + 0.5, indexing="ij")
        return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)

    def _points(self, view: View, labels: np.ndarray, regions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """P pixel centres per region, uniform with repetition among the region's pixels -> (N * P, 2) view px."""
        centres = self.pixel_centres()
        chosen = np.concatenate([rng.choice(np.flatnonzero(labels == r), size=self.params.num_points) for r in regions])
        return map_points(centres[chosen], view.resized(self.params.resolution), view)

    def geometry(self, width: int, height: int, rng: np.random.Generator) -> PointGeometry:
        """Every geometric draw of a sample: the two crops, then ``regions_and_points``."""
        p = self.params
        query = random_resized_crop(width, height, p.crop_size, rng, scale=p.crop_scale)
        key = random_resized_crop(width, height, p.crop_size, rng, scale=p.crop_scale)
        return self.regions_and_points(query, key, View.identity(width, height), rng)

    def regions_and_points(self, query: View, key: View, source: View, rng: np.random.Generator) -> PointGeometry:
        """The N regions (labels in both views' maps, with repetition) and P points per region in each view."""
        p = self.params
        labels_query, labels_key = self.label_map(query, source), self.label_map(key, source)
        common = np.intersect1d(labels_query, labels_key)
        valid = len(common) > 0
        count = p.num_regions * p.num_points
        if valid:
            regions = rng.choice(common, size=p.num_regions).astype(np.int64)
            points_query = self._points(query, labels_query, regions, rng)
            points_key = self._points(key, labels_key, regions, rng)
        else:  # no point loss for this image; finite placeholders at the views' centres
            regions = np.zeros(p.num_regions, dtype=np.int64)
            points_query = points_key = np.full((count, 2), p.crop_size / 2)
        in_key = map_points(points_query, query, key)
        return PointGeometry(
            query, key, regions, valid, points_query, points_key, in_key, points_inside(in_key, key) & valid
        )

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """"query", "key" (3, S, S); "labels" (N P,) region of each point; "points_query",
        "points_key", "points_query_in_key" (N P, 2) x, y view px; "regions_valid" () bool;
        "distill_mask" (N P,) bool."""
        image = sample["image"]
        geo = self.geometry(*image.size, rng)
        views = augmented_view("query", image, geo.query, MOCO_V2_RECIPE, rng)
        views |= augmented_view("key", image, geo.key, MOCO_V2_RECIPE, rng)
        return {
            **views,
            "labels": torch.from_numpy(np.repeat(geo.regions, self.params.num_points)),
            "points_query": torch.from_numpy(geo.points_query).float(),
            "points_key": torch.from_numpy(geo.points_key).float(),
            "points_query_in_key": torch.from_numpy(geo.points_query_in_key).float(),
            "regions_valid": torch.tensor(geo.valid),
            "distill_mask": torch.from_numpy(geo.distill_mask),
        }

    # -- model ------------------------------------------------------------------------------

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_k), (self.head, self.head_k)]

    def momentum_at(self, step_info: StepInfo) -> float:
        return self.params.momentum

    def encode(self, images: torch.Tensor, backbone: nn.Module, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (z (B, D) normalized image embedding, F (B, D, h, w) the head applied per res5 location)."""
        c5 = backbone.forward_stages(images)["c5"]
        dense = head(c5.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        pooled = head(c5.mean(dim=(2, 3))) if self.params.image_embedding == "pooled" else dense.mean(dim=(2, 3))
        return F.normalize(pooled, dim=1), dense

    def sample_points(self, maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) maps at (B, K, 2) x, y view px -> (B, K, D) L2-normalized, bilinear (see the docstring)."""
        grid = points.to(maps.dtype) * (2.0 / self.params.crop_size) - 1.0  # align_corners=False: [0, S] -> [-1, 1]
        sampled = F.grid_sample(maps, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=False)
        return F.normalize(sampled[..., 0].transpose(1, 2), dim=-1)

    def _encode_keys(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, dense = self.encode(inputs["images"], self.backbone_k, self.head_k)
        return {
            "image": image,
            "points": self.sample_points(dense, inputs["points"]),  # p'_k
            "teacher": self.sample_points(dense, inputs["teacher"]),  # p'_i
        }

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        p = self.params
        z, dense = self.encode(batch["query"], self.backbone, self.head)
        queries = self.sample_points(dense, batch["points_query"])  # (B, N P, D) p_i
        inputs = {"images": batch["key"], "points": batch["points_key"], "teacher": batch["points_query_in_key"]}
        keys, everyone = shuffle_bn_encode(  # this rank's (B, ...) and all ranks' (world B, ...); no gradient
            self._encode_keys, inputs, seed=step_info.seed, step=step_info.step, enabled=p.shuffle_bn
        )
        # A copy: the enqueue below writes the buffer that backward still needs.
        image_loss = info_nce(z, keys["image"], self.queue.features.clone(), p.temperature)

        valid = batch["regions_valid"]  # (B,)
        per_image = queries.shape[1]
        if p.point_negatives == "global":
            contrast = everyone["points"].flatten(0, 1)  # (world B N P, D)
            contrast_images = gather.all_gather_no_grad(valid.to(torch.uint8)).bool()
        else:
            contrast, contrast_images = keys["points"].flatten(0, 1), valid
        contrast_mask = contrast_images.repeat_interleave(per_image)  # (M,)
        labels = batch["labels"]  # (B, N P)
        positive = labels[:, :, None] == labels[:, None, :]  # (B, N P, N P): same region, query i vs key k
        point_loss = point_contrast(
            queries, keys["points"], positive, contrast, p.point_temperature,
            contrast_mask=contrast_mask, mask=valid, chunk_size=p.chunk_size,
        )  # fmt: skip
        if step_info.epoch >= p.distill_warmup_epochs:
            distill_loss = affinity_distillation(
                queries, keys["teacher"], contrast, p.student_temperature, p.teacher_temperature,
                contrast_mask=contrast_mask, mask=batch["distill_mask"], chunk_size=p.chunk_size,
            )  # fmt: skip
        else:
            distill_loss = torch.zeros((), device=z.device)
        self.queue.enqueue(everyone["image"])
        total = p.beta * (p.alpha * point_loss + (1 - p.alpha) * distill_loss) + (1 - p.beta) * image_loss
        return {
            "loss": total,
            "loss_image": image_loss,
            "loss_point": point_loss,
            "loss_distill": distill_loss,
            "point_images": valid.float().mean(),  # fraction of images with a region in both views (logged)
            "distill_points": batch["distill_mask"].sum(dim=1).float().mean(),  # teacher rows per image (logged)
        }
