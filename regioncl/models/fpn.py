"""A feature pyramid (Lin et al. 2017) over the backbone's stages, run by torchvision's FeaturePyramidNetwork.

    P_top' = lateral_top(C_top)
    P_l'   = lateral_l(C_l) + upsample_nearest(P_{l+1}', size of C_l)        top-down, l < top
    P_l    = output_l(P_l')                                                  3x3 conv, for l in out_levels

(1x1 laterals and 3x3 outputs, each conv followed by ``norm`` when set; no P6.) ``in_levels`` are
the backbone stages used (2 = C2 ... 5 = C5; SoCo: 2-5, ReSim-FPN: 3-5) and ``out_levels`` the
pyramid levels returned (ReSim-FPN uses P3 and P4 only): a level that is not returned gets no
output conv, so every parameter takes part in the loss (DDP needs that).

State-dict names are indexed from C2 whatever the first level: ``inner_blocks.{l - 2}.0`` (the
lateral conv of C_l) and ``layer_blocks.{l - 2}.0`` (the output conv of P_l), ``.1`` their norm.
These are torchvision's names for a C2-C5 FPN (Faster/Mask R-CNN) and become detectron2's
``fpn_lateral{l}`` / ``fpn_output{l}`` by ``regioncl.convert.KEY_MAPS`` for any first level.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from regioncl.models.norm import norm_layer

FIRST_LEVEL = 2  # C2: state-dict index 0


class FPN(FeaturePyramidNetwork):
    def __init__(
        self,
        stage_channels: Mapping[str, int],
        out_channels: int = 256,
        *,
        in_levels: Sequence[int] = (2, 3, 4, 5),
        out_levels: Sequence[int] | None = None,
        norm: str = "none",
    ) -> None:
        """``stage_channels``: the backbone's {"c2": channels, ...} (``ResNetBackbone.stage_channels``)."""
        in_levels = tuple(in_levels)
        out_levels = in_levels if out_levels is None else tuple(out_levels)
        if not in_levels or in_levels != tuple(range(in_levels[0], in_levels[0] + len(in_levels))) or in_levels[0] < FIRST_LEVEL:
            raise ValueError(f"fpn in_levels: expected consecutive stages from 2 (C2) up, e.g. (3, 4, 5), got {in_levels}")
        if not out_levels or not set(out_levels) <= set(in_levels) or list(out_levels) != sorted(set(out_levels)):
            raise ValueError(f"fpn out_levels: expected increasing levels among in_levels {in_levels}, got {out_levels}")
        missing = [f"c{level}" for level in in_levels if f"c{level}" not in stage_channels]
        if missing:
            raise ValueError(f"fpn: the backbone has no stage(s) {missing}; it has {sorted(stage_channels)}")
        super().__init__([stage_channels[f"c{level}"] for level in in_levels], out_channels, norm_layer=norm_layer(norm))
        self.in_levels, self.out_levels, self.out_channels = in_levels, out_levels, out_channels
        # Key the blocks by level - 2 (a ModuleDict's state-dict names read like a ModuleList's).
        self.inner_blocks = nn.ModuleDict({str(level - FIRST_LEVEL): b for level, b in zip(in_levels, self.inner_blocks)})
        self.layer_blocks = nn.ModuleDict(
            {str(level - FIRST_LEVEL): b for level, b in zip(in_levels, self.layer_blocks) if level in out_levels}
        )

    # torchvision's forward calls these with the position of a level among the inputs.
    def get_result_from_inner_blocks(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        return self.inner_blocks[str(self.in_levels[idx] - FIRST_LEVEL)](x)

    def get_result_from_layer_blocks(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        key = str(self.in_levels[idx] - FIRST_LEVEL)
        return self.layer_blocks[key](x) if key in self.layer_blocks else x  # not returned: dropped below

    def forward(self, stages: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"c2": (B, C2, H/4, W/4), ...} (extra stages ignored) -> {"p{l}": (B, out_channels, H/2^l, W/2^l)} for out_levels."""
        inputs = OrderedDict((f"c{level}", stages[f"c{level}"]) for level in self.in_levels)
        pyramid = super().forward(inputs)
        return {f"p{level}": pyramid[f"c{level}"] for level in self.out_levels}
