"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

    q = g_q(f_q(x_q)) / ||.||,   k = g_k(f_k(x_k)) / ||.||          (f: ResNet, g: 2-layer MLP)
    L = InfoNCE(q, k, queue, tau)                                    (regioncl.losses.info_nce)
    theta_k <- m theta_k + (1 - m) theta_q  after every step        (PretrainMethod.update_momentum)
    queue <- enqueue(all keys of the global batch), dequeue the oldest

Keys are computed with shuffle-BN across ranks (regioncl.models.shuffle_bn) so BN statistics cannot
leak which key is the positive (paper sec. 3.3); with one process it is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from regioncl.augment import MOCO_V2_RECIPE, augmented_view
from regioncl.geometry import random_resized_crop
from regioncl.losses import info_nce
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import FeatureQueue, MLPHead, ResNetBackbone, make_target, shuffle_bn_encode
from regioncl.settings import bounded


@dataclass(frozen=True)
class MocoV2Params:
    feature_dim: int = 128
    hidden_dim: int | None = None  # None: the backbone's width (2048 for R50), as in the paper
    queue_size: int = bounded(65536, ge=1)  # the plan also checks it holds a global batch
    momentum: float = bounded(0.999, ge=0, le=1)
    temperature: float = bounded(0.2, gt=0)
    crop_size: int = bounded(224, ge=1)  # view px of both crops
    crop_scale: tuple[float, float] = (0.2, 1.0)
    shuffle_bn: bool = True


@register_method("moco_v2")
class MocoV2(PretrainMethod):
    Params = MocoV2Params
    pixel_params = ("crop_size",)

    def __init__(self, params: MocoV2Params, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self.backbone = ResNetBackbone(arch)
        width = self.backbone.out_channels
        self.head = MLPHead(width, params.hidden_dim or width, params.feature_dim)
        self.backbone_k = make_target(self.backbone)
        self.head_k = make_target(self.head)
        self.queue = FeatureQueue(params.queue_size, params.feature_dim)

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Two independent random resized crops with the MoCo v2 photometric recipe: (3, S, S) each."""
        width, height = sample["image"].size
        views = {}
        for name in ("query", "key"):
            view = random_resized_crop(width, height, self.params.crop_size, rng, scale=self.params.crop_scale)
            views |= augmented_view(name, sample["image"], view, MOCO_V2_RECIPE, rng)
        return views

    def momentum_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.backbone, self.backbone_k), (self.head, self.head_k)]

    def momentum_at(self, step_info: StepInfo) -> float:
        return self.params.momentum

    def chance_loss(self) -> float:
        """InfoNCE over 1 positive and K queued negatives scoring alike: ln(1 + K)."""
        return math.log(1 + self.params.queue_size)

    def _encode_keys(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head_k(self.backbone_k(images)), dim=1)

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        q = F.normalize(self.head(self.backbone(batch["query"])), dim=1)  # (B, D)
        k, all_keys = shuffle_bn_encode(  # (B, D), (world*B, D) in rank order; no gradient
            self._encode_keys, batch["key"], seed=step_info.seed, step=step_info.step, enabled=self.params.shuffle_bn
        )
        # A copy: the enqueue below writes the buffer that backward still needs.
        loss = info_nce(q, k, self.queue.features.clone(), self.params.temperature)
        self.queue.enqueue(all_keys)
        return {"loss": loss}
