"""ReSim (Xiao et al. 2021, "Region Similarity Representation Learning", arXiv 2103.12902).

MoCo v2 plus a contrast between aligned regions of intermediate feature maps (sec. 3.3):

    x_q, x_k   two MoCo v2 crops of one image, flipped alike (so R_{q->k} = R_k R_q^-1 is a crop-resize)
    u_q^i      windows of ``window`` px every ``stride`` px over the crops' overlap, in x_q's pixels
    u_k^i      = R_{q->k}(u_q^i); a window that leaves x_k is dropped (the ``windows_*_mask``)
    r_q^i      = PrRoIPool_1x1(h(F(x_q)), u_q^i) / ||.||        F: C4 (resim_c4), FPN P4 and P3 (resim_fpn)
    r_k^i      = PrRoIPool_1x1(h'(F'(x_k)), u_k^i) / ||.||      momentum encoder, shuffle-BN, no gradient
    N          = AvgPool_{k x k, stride 1}(h'(F'(x_k))) / ||.||  every cell of the batch's key maps (App. A.1)
    L_rs       = mean over valid windows of -log( e^{r_q.r_k / tau} / (e^{r_q.r_k / tau} + sum_n e^{r_q.n / tau}) )
    L_is       = InfoNCE(q, k, queue, tau)                       q, k: MLP(GAP(C5)), MoCo v2's image loss
    L          = sum over levels of L_rs + lambda L_is,  lambda = 1, tau = 0.2 for both (App. A.1)

Eqs. 2 and 4 are printed without their -log; this is the InfoNCE the code computes. Windows are
pooled by the exact 1x1 PrRoIPool (``regioncl.models.roi.precise_roi_pool``); the region loss is
``regioncl.losses.info_nce`` masked over the valid windows of the global batch, so a batch
without any valid window gives 0, not the released code's NaN.

Choices ([P] paper, [C] released code Tete-Xiao/ReSim, [R] MoCo v2, [D] ours; spec_resim.md):
- Windows [P]: ``windows: overlap`` slides them over the crops' overlap, from its top-left
  corner in the query view, those that fit inside it. ``windows: grid`` [C] is the released fixed
  grid from the query view's origin (6 x 6 on C4, 8 x 8 on P3 at 224 px) keeping the windows whose
  mapping lies inside the key view. 48/32 px on C4 or P4, 32/24 on P3 [P sec. 3.4]; window sizes
  are tied to the feature strides (3 cells on C4), so they do not scale with ``crop_size``.
- Region projection [P sec. 3.4]: ``projection: conv``, per level conv3x3(C -> hidden)-BN-ReLU-
  conv3x3(-> 128), applied to the whole map before pooling (as the densely pooled negatives
  need); ``projection_hidden_dim`` None is C [D]: the paper gives only "C4: 1024 -> 128".
  ``projection: none`` [C] pools the maps themselves (FPN: 256-d; C4: 1024-d).
- Negatives [P App. A.1]: 3 x 3 average pooling at stride 1 on every level (the printed counts
  12 x 12 on C4/P4 and 26 x 26 on P3, and [C]; the "same rationale" reading, 32 / 8 = 4 on P3, is
  ``negative_kernel: 4``), L2-normalized [C], not de-duplicated against the positive [C].
  C4/P4 negatives are gathered over all ranks, P3's are per rank [P] (``gather_negatives``), so
  P3's count depends on the number of processes, as in the paper (32 images per GPU).
- PrRoIPool coordinates [P][C]: the released operator's, u = x / stride (``pool_aligned: false``;
  true: cell centres at (j + 0.5) stride, as RoIAlign elsewhere here).
- FPN [P sec. 3.3][C]: laterals on C3-C5 (256 wide), 3x3 outputs on P3 and P4 only. Its norm is
  not stated; ``fpn_norm: bn`` [D] is what the COCO protocol's BN-FPN (sec. 4.2) loads as
  ReSim-FPN^T; [C]'s default is ``none`` (biases instead).
- Image branch [C][R]: GAP(C5) -> Linear(C5, 2048)-ReLU-Linear(2048, 128), the MoCo v2 head;
  queue 65,536, m 0.999, shuffle-BN for every key-side output.
- Shared flip [P sec. 3.3]: the key crop takes the query crop's flip. [C] flips the source once
  and crops it twice: the same distribution, since a crop's placement is mirror-symmetric.
- Averaging [C]: one mean over all valid windows of the batch; eq. 2 averages per image first.
- Edges [D]: a mapped window may end exactly on the key view's edge (``geometry.boxes_inside``);
  the released code drops x2 = 224 (a measure-zero case for continuous crops).
- The MoCo-based variant only; the SimSiam one (sec. 4.1, ~3x slower) is not implemented.

``resim_c4`` and ``resim_fpn`` differ by their neck (C4 itself, or the FPN) and their levels;
transfer exports the ResNet, and for ``resim_fpn`` also the FPN (ReSim-FPN^T: the benchmark's
``transfer`` decides whether the detector loads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from regioncl.augment import MOCO_V2_RECIPE, augmented_view
from regioncl.geometry import (
    View,
    boxes_inside,
    crop_intersection,
    map_boxes,
    random_resized_crop,
    sliding_windows,
)
from regioncl.losses import info_nce
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import FPN, FeatureQueue, MLPHead, ResNetBackbone, make_target, shuffle_bn_encode
from regioncl.models.roi import precise_roi_pool
from regioncl.settings import bounded


@dataclass(frozen=True)
class RegionLevel:
    """One feature map the region loss runs on, and its windows (px of the query view)."""

    feature: str  # "c4" (resim_c4), "p4" / "p3" (resim_fpn): stride 2^level view px
    window: float = bounded(48.0, gt=0)
    stride: float = bounded(32.0, gt=0)
    negative_kernel: int = bounded(3, ge=1)  # avg-pool kernel (cells) of the dense key negatives
    gather_negatives: bool = True  # negatives from every rank's key maps (False: this rank's)


C4_LEVELS = (RegionLevel("c4", 48.0, 32.0),)
FPN_LEVELS = (RegionLevel("p4", 48.0, 32.0), RegionLevel("p3", 32.0, 24.0, gather_negatives=False))


@dataclass(frozen=True)
class ResimParams:
    levels: tuple[RegionLevel, ...] = C4_LEVELS
    windows: Literal["overlap", "grid"] = "overlap"
    projection: Literal["conv", "none"] = "conv"
    projection_hidden_dim: int | None = bounded(None, ge=1)  # None: the level's channels
    pool_aligned: bool = False
    image_loss_weight: float = bounded(1.0, ge=0)  # lambda
    feature_dim: int = bounded(128, ge=1)  # image and region embeddings
    hidden_dim: int | None = bounded(None, ge=1)  # image head; None: the backbone's width (2048 for R50)
    queue_size: int = bounded(65536, ge=1)  # the plan also checks it holds a global batch
    momentum: float = bounded(0.999, ge=0, le=1)
    temperature: float = bounded(0.2, gt=0)
    crop_size: int = bounded(224, ge=1)  # view px of both crops
    crop_scale: tuple[float, float] = (0.2, 1.0)
    shuffle_bn: bool = True


@dataclass(frozen=True)
class ResimFpnParams(ResimParams):
    levels: tuple[RegionLevel, ...] = FPN_LEVELS
    fpn_channels: int = bounded(256, ge=1)
    fpn_norm: Literal["bn", "none"] = "bn"


class StageMaps(nn.Module):
    """The neck of ReSim-C4: the backbone's own stages, {"c4": (B, C4, H/16, W/16), ...}."""

    def __init__(self, features: tuple[str, ...]) -> None:
        super().__init__()
        self.features = features

    def forward(self, stages: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: stages[name] for name in self.features}


def region_projection(channels: int, hidden: int, out: int) -> nn.Sequential:
    """[P sec. 3.4] two 3x3 convs to ``out`` channels, the first followed by BN and ReLU: (B, C, H, W) -> (B, out, H, W)."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out, 3, padding=1),
    )


@register_method("resim_c4")
class ResimC4(PretrainMethod):
    Params = ResimParams
    pixel_params = ("crop_size",)
    features: ClassVar[tuple[str, ...]] = ("c3", "c4")  # maps a level may name
    ragged_keys = frozenset(f"windows_{name}" for name in features)

    def __init__(self, params: ResimParams, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        names = [level.feature for level in params.levels]
        if not names or len(set(names)) != len(names) or not set(names) <= set(self.features):
            raise ValueError(f"{self.name}: levels: expected distinct features among {list(self.features)}, got {names}")
        for level in params.levels:
            cells = params.crop_size // 2 ** int(level.feature[1:])
            if cells < level.negative_kernel:
                raise ValueError(
                    f"{self.name}: crop_size {params.crop_size} leaves {level.feature} {cells} x {cells} cells, "
                    f"fewer than its negative_kernel {level.negative_kernel}"
                )
        self.backbone = ResNetBackbone(arch)
        width = self.backbone.out_channels
        self.head = MLPHead(width, params.hidden_dim or width, params.feature_dim)
        self.neck = self.build_neck()
        channels = self.map_channels()
        if params.projection == "conv":
            hidden = {name: params.projection_hidden_dim or channels[name] for name in names}
            heads = {name: region_projection(channels[name], hidden[name], params.feature_dim) for name in names}
            self.projection = nn.ModuleDict(heads)
        else:
            self.projection = nn.ModuleDict({name: nn.Identity() for name in names})
        self.backbone_k, self.neck_k = make_target(self.backbone), make_target(self.neck)
        self.projection_k, self.head_k = make_target(self.projection), make_target(self.head)
        self.queue = FeatureQueue(params.queue_size, params.feature_dim)

    def build_neck(self) -> nn.Module:
        return StageMaps(tuple(level.feature for level in self.params.levels))

    def map_channels(self) -> dict[str, int]:
        """Channels of each level's map before the projection."""
        return {level.feature: self.backbone.stage_channels[level.feature] for level in self.params.levels}

    # -- views ------------------------------------------------------------------------------

    def crops(self, width: int, height: int, rng: np.random.Generator) -> tuple[View, View]:
        """The query and key crops (the key takes the query's flip): every geometric draw of a sample."""
        p = self.params
        query = random_resized_crop(width, height, p.crop_size, rng, scale=p.crop_scale)
        key = random_resized_crop(width, height, p.crop_size, rng, scale=p.crop_scale)
        return query, dataclasses.replace(key, flip=query.flip)

    def window_pairs(self, query: View, key: View, source: View, level: RegionLevel) -> np.ndarray:
        """(K, 2, 4) float64: [:, 0] a window in query px, [:, 1] the same source region in key px;
        only windows wholly inside both views. ``source``: the image's own frame."""
        if self.params.windows == "overlap":
            overlap = crop_intersection(query, key)
            if overlap is None:
                return np.zeros((0, 2, 4))
            region = map_boxes(np.asarray(overlap)[None], source, query)[0]
        else:  # the released grid: origin 0, windows ending before the last pixel (6 x 6 / 8 x 8 at 224 px)
            region = np.array([0.0, 0.0, query.out_w - 1.0, query.out_h - 1.0])
        in_query = sliding_windows(region, level.window, level.stride)
        in_key = map_boxes(in_query, query, key)
        kept = boxes_inside(in_query, query) & boxes_inside(in_key, key)
        return np.stack([in_query[kept], in_key[kept]], axis=1)

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """"query", "key" (3, S, S); "windows_<feature>" (K, 2, 4) window pairs, x1y1x2y2 px of the
        query [:, 0] and key [:, 1] view (ragged: collated with a mask)."""
        image = sample["image"]
        width, height = image.size
        query, key = self.crops(width, height, rng)
        views = augmented_view("query", image, query, MOCO_V2_RECIPE, rng)
        views |= augmented_view("key", image, key, MOCO_V2_RECIPE, rng)
        source = View.identity(width, height)
        for level in self.params.levels:
            views[f"windows_{level.feature}"] = torch.from_numpy(self.window_pairs(query, key, source, level)).float()
        return views

    # -- model ------------------------------------------------------------------------------

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.backbone, self.backbone_k), (self.neck, self.neck_k), (self.projection, self.projection_k), (self.head, self.head_k),
        ]  # fmt: skip

    def momentum_at(self, step_info: StepInfo) -> float:
        return self.params.momentum

    @staticmethod
    def encode(
        images: torch.Tensor, backbone: nn.Module, neck: nn.Module, projection: nn.ModuleDict, head: nn.Module
    ) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) -> {"image": (B, D) normalized MLP(GAP(C5)), "<feature>": (B, D_r, h, w) projected maps}."""
        stages = backbone.forward_stages(images)
        maps = neck(stages)
        image = F.normalize(head(stages["c5"].mean(dim=(2, 3))), dim=1)
        return {"image": image, **{name: projection[name](maps[name]) for name in projection}}

    def _encode_keys(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode(images, self.backbone_k, self.neck_k, self.projection_k, self.head_k)

    def pool(self, feature: torch.Tensor, boxes: torch.Tensor, name: str) -> torch.Tensor:
        """(B, D, h, w) map + (B, K, 4) view px -> (B, K, D) L2-normalized PrRoIPool features."""
        stride = 2 ** int(name[1:])
        return F.normalize(precise_roi_pool(feature, boxes, stride, aligned=self.params.pool_aligned), dim=-1)

    @staticmethod
    def dense_negatives(maps: torch.Tensor, kernel: int) -> torch.Tensor:
        """(N, D, h, w) key maps -> (N * (h - k + 1) * (w - k + 1), D): every k x k average, L2-normalized."""
        pooled = F.normalize(F.avg_pool2d(maps, kernel, stride=1), dim=1)
        return pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        p = self.params
        queries = self.encode(batch["query"], self.backbone, self.neck, self.projection, self.head)
        keys, everyone = shuffle_bn_encode(  # this rank's (B, ...) and all ranks' (world * B, ...); no gradient
            self._encode_keys, batch["key"], seed=step_info.seed, step=step_info.step, enabled=p.shuffle_bn
        )
        # A copy: the enqueue below writes the buffer that backward still needs.
        image_loss = info_nce(queries["image"], keys["image"], self.queue.features.clone(), p.temperature)
        losses = {"loss_image": image_loss}
        total = p.image_loss_weight * image_loss
        for level in p.levels:
            name = level.feature
            windows, mask = batch[f"windows_{name}"], batch[f"windows_{name}_mask"]  # (B, K, 2, 4), (B, K)
            region_q = self.pool(queries[name], windows[:, :, 0], name)  # (B, K, D)
            region_k = self.pool(keys[name], windows[:, :, 1], name)
            negatives = self.dense_negatives((everyone if level.gather_negatives else keys)[name], level.negative_kernel)
            losses[f"loss_region_{name}"] = info_nce(region_q, region_k, negatives, p.temperature, mask=mask)
            losses[f"windows_{name}"] = mask.sum(dim=1).float().mean()  # valid windows per image (logged)
            total = total + losses[f"loss_region_{name}"]
        self.queue.enqueue(everyone["image"])
        return {"loss": total, **losses}


@register_method("resim_fpn")
class ResimFpn(ResimC4):
    Params = ResimFpnParams
    features = ("p3", "p4", "p5")
    ragged_keys = frozenset(f"windows_{name}" for name in features)

    def build_neck(self) -> nn.Module:
        levels = sorted(int(level.feature[1:]) for level in self.params.levels)
        p = self.params
        return FPN(self.backbone.stage_channels, p.fpn_channels, in_levels=(3, 4, 5), out_levels=levels, norm=p.fpn_norm)

    def map_channels(self) -> dict[str, int]:
        return {level.feature: self.params.fpn_channels for level in self.params.levels}

    def transfer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """The ResNet, and the FPN (C3-C5 laterals, P3/P4 outputs; torchvision names counted from C2)."""
        return self.backbone.state_dict(), {"fpn": self.neck.state_dict()}
