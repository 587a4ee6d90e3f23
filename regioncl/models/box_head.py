"""The 4conv1fc box head of Mask R-CNN R50-FPN detectors with a normalized head (SoCo's object encoder).

    h = ReLU(fc1(flatten(conv4(conv3(conv2(conv1(x)))))))      conv_k = ReLU(norm(Conv3x3(.)))

x: (N, in_channels, S, S) RoI features -> h: (N, fc_dim). Parameter names follow detectron2's
``FastRCNNConvFCHead`` (``conv{k}.weight``, ``conv{k}.norm.*``, ``fc1.*``), so
``regioncl.convert.KEY_MAPS`` renames them to detectron2's ``box_head.*`` and to torchvision's
``FastRCNNConvFCHead`` (``roi_heads.box_head.{k-1}.0/1.*``, ``roi_heads.box_head.5.*``). Both
flatten (C, S, S) channel-major, so ``fc1`` transfers as is. Initialization as detectron2:
MSRA fill (fan out) for the convs, Xavier-uniform (kaiming a=1) for the fc.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from regioncl.models.norm import norm_layer


class ConvNormReLU(nn.Conv2d):
    """A 3x3 conv owning its norm as ``.norm`` (detectron2's Conv2d layout); bias only without a norm."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        make_norm = norm_layer(norm)
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=make_norm is None)
        self.norm = nn.Identity() if make_norm is None else make_norm(out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(super().forward(x)))


class ConvFCBoxHead(nn.Module):
    NUM_CONV = 4

    def __init__(
        self, in_channels: int = 256, *, conv_dim: int = 256, fc_dim: int = 1024, input_size: int = 7, norm: str = "bn"
    ) -> None:
        super().__init__()
        for k in range(1, self.NUM_CONV + 1):
            self.add_module(f"conv{k}", ConvNormReLU(in_channels if k == 1 else conv_dim, conv_dim, norm))
        self.fc1 = nn.Linear(conv_dim * input_size * input_size, fc_dim)
        nn.init.kaiming_uniform_(self.fc1.weight, a=1)
        nn.init.zeros_(self.fc1.bias)
        self.input_size, self.out_channels = input_size, fc_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, S, S) -> (N, fc_dim)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"box head: expected {self.input_size}x{self.input_size} RoI features, got {tuple(x.shape)}")
        for k in range(1, self.NUM_CONV + 1):
            x = getattr(self, f"conv{k}")(x)
        return F.relu(self.fc1(torch.flatten(x, start_dim=1)))
