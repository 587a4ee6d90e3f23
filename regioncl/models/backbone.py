"""torchvision ResNets as pretraining backbones: every stage (C2-C5) and the pooled feature.

The module keeps torchvision's attribute names (conv1, bn1, layer1..layer4), so its state dict
is exactly torchvision's ResNet state dict without ``fc.*`` -- the pretrained checkpoint's
``backbone`` entry (docs/architecture.md).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from regioncl.archs import ARCHS

RESNET_BUILDERS = {arch: getattr(torchvision.models, arch) for arch in ARCHS}


class ResNetBackbone(nn.Module):
    def __init__(self, arch: str) -> None:
        super().__init__()
        if arch not in RESNET_BUILDERS:
            raise ValueError(f"arch: expected one of {sorted(RESNET_BUILDERS)}, got {arch!r}")
        resnet = RESNET_BUILDERS[arch](weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.out_channels = resnet.fc.in_features  # 512 (R18/34), 2048 (R50/101)
        # Channels double per stage: R18/34 64, 128, 256, 512; R50/101 256, 512, 1024, 2048.
        self.stage_channels = {f"c{level}": self.out_channels >> (5 - level) for level in (2, 3, 4, 5)}

    def forward_stages(self, images: torch.Tensor, *, until: str = "c5") -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"c2": (B, C2, H/4, W/4), ..., "c5": (B, C5, H/32, W/32)}.

        ``until``: the last stage computed (e.g. "c4" when res5 runs elsewhere, as SoCo-C4's RoI head).
        """
        if until not in self.stage_channels:
            raise ValueError(f"until: expected one of {list(self.stage_channels)}, got {until!r}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        stages = {}
        for name, layer in (("c2", self.layer1), ("c3", self.layer2), ("c4", self.layer3), ("c5", self.layer4)):
            x = layer(x)
            stages[name] = x
            if name == until:
                break
        return stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, out_channels) globally average-pooled C5."""
        return self.forward_stages(images)["c5"].mean(dim=(2, 3))
