"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

    z = g(f(x)),  p = q(z)            online: ResNet f, projector g, predictor q (MLP 4096-BN-ReLU-256)
    z' = g'(f'(x'))                   target: EMA of f and g only, no predictor
    L = byol_loss(p1, z'2) + byol_loss(p2, z'1)       (symmetrized 2 - 2 cos; regioncl.losses)
    xi <- tau_k xi + (1 - tau_k) theta,  tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2

The two views use BYOL's asymmetric photometric recipes (augment.BYOL_RECIPES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from regioncl.augment import BYOL_RECIPES, augmented_view
from regioncl.geometry import random_resized_crop
from regioncl.losses import byol_loss
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import MLPHead, ResNetBackbone, cosine_momentum, make_target
from regioncl.settings import bounded


@dataclass(frozen=True)
class ByolParams:
    feature_dim: int = 256
    hidden_dim: int = 4096
    base_momentum: float = bounded(0.99, ge=0, le=1)  # tau_base; rises to 1 by the last step
    crop_size: int = bounded(224, ge=1)  # view px of both crops
    crop_scale: tuple[float, float] = (0.08, 1.0)


@register_method("byol")
class Byol(PretrainMethod):
    Params = ByolParams
    pixel_params = ("crop_size",)

    def __init__(self, params: ByolParams, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self.backbone = ResNetBackbone(arch)
        head = dict(num_layers=2, batch_norm=True)
        self.projector = MLPHead(self.backbone.out_channels, params.hidden_dim, params.feature_dim, **head)
        self.predictor = MLPHead(params.feature_dim, params.hidden_dim, params.feature_dim, **head)
        self.backbone_target = make_target(self.backbone)
        self.projector_target = make_target(self.projector)

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Two random resized crops, one per BYOL recipe: "view1", "view2" (3, S, S) each."""
        width, height = sample["image"].size
        views = {}
        for name, recipe in zip(("view1", "view2"), BYOL_RECIPES):
            view = random_resized_crop(width, height, self.params.crop_size, rng, scale=self.params.crop_scale)
            views |= augmented_view(name, sample["image"], view, recipe, rng)
        return views

    def momentum_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.backbone, self.backbone_target), (self.projector, self.projector_target)]

    def momentum_at(self, step_info: StepInfo) -> float:
        return cosine_momentum(step_info.step, base_momentum=self.params.base_momentum, total_steps=step_info.total_steps)

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        # One pass per view, as in BYOL's code: BN statistics are per view.
        p1, p2 = (self.predictor(self.projector(self.backbone(batch[v]))) for v in ("view1", "view2"))  # (B, D)
        with torch.no_grad():
            z1, z2 = (self.projector_target(self.backbone_target(batch[v])) for v in ("view1", "view2"))
        return {"loss": byol_loss(p1, z2) + byol_loss(p2, z1)}
