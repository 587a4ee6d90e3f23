"""MLP projection/prediction heads (MoCo v2: Linear-ReLU-Linear; BYOL: Linear-BN-ReLU-Linear)."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """(B, in_dim) -> (B, out_dim) through ``num_layers`` linear layers with ReLU (and optional BN) between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 2, batch_norm: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
