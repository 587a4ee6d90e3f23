"""DetCo (Xie et al. 2021, "DetCo: Unsupervised Contrastive Learning for Object Detection", arXiv 2102.04803v1).

MoCo v2 with hierarchical intermediate contrast (HIC) and cross global-and-local contrast (CGLC):

    I_q, I_k = T_g(x), T_g(x)              two global crops (MoCo v2 recipe)
    P_q, P_k = T_l(x), T_l(x)              two jigsaw sets of G*G patches (PIRL: crop, grid, jitter)
    at each stage s in (Res2..Res5), from the one backbone (patches pass through it one by one):
      q_s^g = mlp_s^g(GAP f_s(I_q)),  q_s^l = mlp_s^l([GAP f_s(p_1), ..., GAP f_s(p_9)])   (concatenated in order)
      k_s^g, k_s^l likewise from the momentum backbone and heads (shuffle-BN over images and patches)
    L = sum_s w_s (L_gg^s + L_lg^s + L_ll^s),   w = (0.1, 0.4, 0.7, 1.0)                  (eq. 1)
      L_gg^s = InfoNCE(q_s^g, k_s^g, queue_s^g),  L_lg^s = InfoNCE(q_s^l, k_s^g, queue_s^g)  (eq. 2, 4)
      L_ll^s = InfoNCE(q_s^l, k_s^l, queue_s^l)                                               (eq. 5)
    8 queues ({global, local} x 4 stages) and the momentum copies of the backbone and all 8 heads
    (regioncl.models.multilevel.MultiLevelContrast).

Choices where the paper is silent (spec_detco.md; [P] paper, [R] MoCo v2 / PIRL default, [D] spec decision):
- T_g [P/R]: RandomResizedCrop(224, scale (0.2, 1)), MoCo v2's jitter/grayscale/blur, flip.
- T_l [P]: RandomResizedCrop(255, scale (0.6, 1)) with flip, the same photometric recipe as T_g
  on the whole 255 px image ([D] grayscale included), then a 3x3 grid of 85 px cells, each
  randomly cropped to 64 px. The flip is applied before gridding, so patch j is cell j of the
  (possibly flipped) local view in row-major order.
- Patch order [D]: row-major grid order (``patch_order: grid``); ``shuffled`` permutes the 9
  patches per set as PIRL does (the spec's ablation).
- Heads [P/D]: 2-layer MLP (Linear-ReLU-Linear, 128-D) per stage and branch; the global head's
  hidden width is 2048 (``global_hidden_dim``; ``None``: the stage's width C_s, the spec's
  alternative); the local head takes the 9 pooled patch features concatenated (9 C_s inputs) and
  its hidden width is ``local_hidden_dim`` (2048; ``None``: 9 C_s).
- tau 0.2, K 65,536 per queue, m 0.999, shuffle-BN on the key encoder over the global crops and
  over the patches of each image (whole images, their 9 patches together) [R MoCo v2].
- ``cglc: false`` drops the local views and contrasts (HIC only, Tab. 1/2 row (b)).
Not implemented: the "+AA" variant (RandAugment; its policy and views are not stated), a queue
shared across levels (Tab. 16 ablation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from regioncl.augment import MOCO_V2_RECIPE, augmented_view, cut_patches
from regioncl.geometry import View, grid_cells, random_resized_crop
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import ResNetBackbone, make_target, shuffle_bn_encode
from regioncl.models.multilevel import STAGES, Contrast, Levels, MultiLevelContrast
from regioncl.settings import bounded


@dataclass(frozen=True)
class DetCoParams:
    feature_dim: int = bounded(128, ge=1)
    global_hidden_dim: int | None = bounded(2048, ge=1)  # None: the stage's width C_s
    local_hidden_dim: int | None = bounded(2048, ge=1)  # None: the local input width G*G C_s
    queue_size: int = bounded(65536, ge=1)  # per queue; the plan also checks it holds a global batch
    momentum: float = bounded(0.999, ge=0, le=1)
    temperature: float = bounded(0.2, gt=0)
    stage_weights: tuple[float, float, float, float] = (0.1, 0.4, 0.7, 1.0)  # Res2..Res5, not normalized
    global_size: int = bounded(224, ge=1)  # view px of both global crops
    global_scale: tuple[float, float] = (0.2, 1.0)
    cglc: bool = True  # the local patch sets and the local<->global, local<->local contrasts
    local_size: int = bounded(255, ge=1)  # view px of the local crop before gridding
    local_scale: tuple[float, float] = (0.6, 1.0)
    grid: int = bounded(3, ge=1)  # G: G x G cells of local_size / G px
    patch_size: int = bounded(64, ge=1)  # px of the patch cut from each cell
    patch_order: Literal["grid", "shuffled"] = "grid"
    shuffle_bn: bool = True


@register_method("detco")
class DetCo(PretrainMethod):
    Params = DetCoParams
    pixel_params = ("global_size", "local_size", "patch_size")

    def __init__(self, params: DetCoParams, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self._patch_ranges(params)  # raises when a cell cannot hold a patch
        self.backbone = ResNetBackbone(arch)
        self.backbone_k = make_target(self.backbone)
        widths = self.backbone.stage_channels
        in_dims = {"global": dict(widths)}
        hidden = {"global": params.global_hidden_dim}
        contrasts = [Contrast("gg", "global", "global")]
        if params.cglc:
            in_dims["local"] = {stage: params.grid**2 * width for stage, width in widths.items()}
            hidden["local"] = params.local_hidden_dim
            contrasts += [Contrast("lg", "local", "global"), Contrast("ll", "local", "local")]
        self.contrast = MultiLevelContrast(
            in_dims,
            hidden_dims=hidden,
            feature_dim=params.feature_dim,
            queue_size=params.queue_size,
            temperature=params.temperature,
            weights=dict(zip(STAGES, params.stage_weights, strict=True)),
            contrasts=contrasts,
        )

    def jigsaw_geometry(self, width: int, height: int, rng: np.random.Generator) -> tuple[View, np.ndarray, np.ndarray]:
        """The local view of a source image, its G*G cells and one patch per cell.

        Returns (view: local_size px square, maybe flipped; cells (G*G, 4) and patches (G*G, 4),
        x1y1x2y2 in the view's pixels, row-major; each patch an integer patch_size square inside its cell).
        """
        p = self.params
        view = random_resized_crop(width, height, p.local_size, rng, scale=p.local_scale)
        cells, low, high = self._patch_ranges(p)
        corners = rng.integers(low, high + 1).astype(np.float64)  # (G*G, 2) patch x1, y1
        return view, cells, np.concatenate([corners, corners + p.patch_size], axis=1)

    @staticmethod
    def _patch_ranges(p: DetCoParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The grid's cells (G*G, 4) in local-view px, and the (G*G, 2) lowest / highest integer x1, y1 of a patch in each."""
        cells = grid_cells((0.0, 0.0, float(p.local_size), float(p.local_size)), p.grid)
        low = np.ceil(cells[:, :2] - 1e-9).astype(np.int64)
        high = np.floor(cells[:, 2:] + 1e-9).astype(np.int64) - p.patch_size
        if (high < low).any():
            raise ValueError(
                f"detco: local_size {p.local_size} px split into {p.grid} x {p.grid} cells cannot hold a patch_size "
                f"{p.patch_size} px patch in every cell"
            )
        return cells, low, high

    def _local_set(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """One jigsaw set as ``make_views`` gives it outside the engine's loader: (G*G, 3, patch_size, patch_size)."""
        return self._local_views("local", image, rng)["local"]

    def _local_views(self, name: str, image: Image.Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One jigsaw set: {name: (G*G, 3, patch_size, patch_size)}, the local view's photometric recipe
        applied before gridding (in the engine's "device" mode: the whole view, cut on the device)."""
        view, _, patches = self.jigsaw_geometry(*image.size, rng)
        local = augmented_view(name, image, view, MOCO_V2_RECIPE, rng)
        order = rng.permutation(len(patches)) if self.params.patch_order == "shuffled" else np.arange(len(patches))
        return cut_patches(local, name, patches[order])

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """"global_q", "global_k": (3, S, S) crops; with CGLC "local_q", "local_k": (G*G, 3, P, P) patch sets."""
        image = sample["image"]
        width, height = image.size
        views = {}
        for name in ("global_q", "global_k"):
            view = random_resized_crop(width, height, self.params.global_size, rng, scale=self.params.global_scale)
            views |= augmented_view(name, image, view, MOCO_V2_RECIPE, rng)
        if self.params.cglc:
            views |= self._local_views("local_q", image, rng)
            views |= self._local_views("local_k", image, rng)
        return views

    def momentum_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.backbone, self.backbone_k), *self.contrast.momentum_pairs()]

    def momentum_at(self, step_info: StepInfo) -> float:
        return self.params.momentum

    @staticmethod
    def pooled(backbone: ResNetBackbone, views: dict[str, torch.Tensor]) -> Levels:
        """{"global": (B, 3, S, S)[, "local": (B, G*G, 3, P, P)]} -> branch -> stage -> (B, C_s) / (B, G*G C_s).

        Patches go through the backbone as a batch of B*G*G images; their pooled features are
        concatenated per image in patch order.
        """
        features = {"global": {s: f.mean(dim=(2, 3)) for s, f in backbone.forward_stages(views["global"]).items()}}
        if "local" in views:
            batch = views["local"].shape[0]
            maps = backbone.forward_stages(views["local"].flatten(0, 1))
            features["local"] = {s: f.mean(dim=(2, 3)).reshape(batch, -1) for s, f in maps.items()}
        return features

    def _views(self, batch: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
        return {branch: batch[f"{branch}_{side}"] for branch in ("global", "local") if f"{branch}_{side}" in batch}

    def _encode_keys(self, views: dict[str, torch.Tensor]) -> Levels:
        return self.contrast.keys(self.pooled(self.backbone_k, views))

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        queries = self.contrast.queries(self.pooled(self.backbone, self._views(batch, "q")))
        keys, all_keys = shuffle_bn_encode(  # branch -> stage -> (B, D) and (world*B, D); no gradient
            self._encode_keys, self._views(batch, "k"), seed=step_info.seed, step=step_info.step, enabled=self.params.shuffle_bn
        )
        losses = self.contrast.loss(queries, keys)
        self.contrast.enqueue(all_keys)
        return losses
