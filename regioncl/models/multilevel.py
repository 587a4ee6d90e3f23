"""Multi-level image contrast, written once for DetCo (HIC + CGLC) and DUPR (its image-level loss).

Every *branch* b (DetCo: "global", the pooled crop features, and "local", the concatenated pooled
patch features; DUPR: "global" only) has at every backbone stage s its own 2-layer MLP head
(MoCo v2's Linear-ReLU-Linear, with the stage's input width), a momentum copy of it, and its own
queue of keys (DetCo Tab. 16: one queue per level and head, never shared):

    q_s^b = mlp_s^b(x_s^b) / ||.||,    k_s^b = mlp'_s^b(x'_s^b) / ||.||      x: (B, C_in) per stage
    L = sum_s w_s sum_{(a, b) in contrasts} InfoNCE(q_s^a, k_s^b, queue_s^b, tau)   (DetCo eq. 1)

A contrast (a, b) takes branch a's query and branch b's positive key, with negatives from
branch b's queue: DetCo's global<->global (global, global), local<->global (local, global; eq. 4:
local query, global key and global queue) and local<->local (local, local). Within a stage
every contrast weighs 1; the stage weights are not normalized (DetCo Tab. 15). After the loss
every branch's keys of the global batch are enqueued in its own queues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from regioncl.losses import info_nce
from regioncl.models.heads import MLPHead
from regioncl.models.momentum import FeatureQueue, make_target

Levels = dict[str, dict[str, torch.Tensor]]  # branch -> stage -> (N, ...) tensor
STAGES = ("c2", "c3", "c4", "c5")  # ResNet stages Res2..Res5 (ResNetBackbone.forward_stages), the order of per-stage tuples


@dataclass(frozen=True)
class Contrast:
    """One InfoNCE per stage: ``query`` branch's queries against ``key`` branch's keys and queue."""

    name: str  # logged as "loss_<name>" (the weighted sum over stages)
    query: str
    key: str


class MultiLevelContrast(nn.Module):
    """Per-(branch, stage) MLP heads, their momentum copies and queues; the weighted multi-level InfoNCE.

    in_dims: branch -> stage -> input width C_in. hidden_dims: branch -> hidden width (``None``:
    the input width, per stage). weights: stage -> w_s.
    """

    def __init__(
        self,
        in_dims: Mapping[str, Mapping[str, int]],
        *,
        hidden_dims: Mapping[str, int | None],
        feature_dim: int,
        queue_size: int,
        temperature: float,
        weights: Mapping[str, float],
        contrasts: Sequence[Contrast],
    ) -> None:
        super().__init__()
        for contrast in contrasts:
            missing = {contrast.query, contrast.key} - set(in_dims)
            if missing:
                raise ValueError(
                    f"contrast {contrast.name!r}: unknown branch(es) {sorted(missing)}; branches: {sorted(in_dims)}"
                )
        for branch, dims in in_dims.items():
            if set(dims) != set(weights):
                raise ValueError(
                    f"branch {branch!r}: stages {sorted(dims)} differ from the weighted stages {sorted(weights)}"
                )
        self.weights = dict(weights)
        self.contrasts = tuple(contrasts)
        self.temperature = temperature
        self.heads = nn.ModuleDict(
            {
                branch: nn.ModuleDict(
                    {stage: MLPHead(width, hidden_dims[branch] or width, feature_dim) for stage, width in dims.items()}
                )
                for branch, dims in in_dims.items()
            }
        )
        self.heads_k = make_target(self.heads)
        self.queues = nn.ModuleDict(
            {
                branch: nn.ModuleDict({stage: FeatureQueue(queue_size, feature_dim) for stage in dims})
                for branch, dims in in_dims.items()
            }
        )

    @staticmethod
    def _embed(heads: nn.ModuleDict, features: Levels) -> Levels:
        return {
            branch: {stage: F.normalize(heads[branch][stage](x), dim=1) for stage, x in stages.items()}
            for branch, stages in features.items()
        }

    def queries(self, features: Levels) -> Levels:
        """branch -> stage -> (B, C_in) -> the online heads' L2-normalized (B, D) queries."""
        return self._embed(self.heads, features)

    @torch.no_grad()
    def keys(self, features: Levels) -> Levels:
        """branch -> stage -> (B, C_in) -> the momentum heads' L2-normalized (B, D) keys."""
        return self._embed(self.heads_k, features)

    def loss(self, queries: Levels, keys: Levels) -> dict[str, torch.Tensor]:
        """{"loss": L, "loss_<contrast>": its weighted sum over stages}, against the queues as they are now."""
        # Copies: the enqueue after this writes the buffers that backward still needs.
        negatives = {
            branch: {stage: queue.features.clone() for stage, queue in stages.items()} for branch, stages in self.queues.items()
        }
        terms = {}
        for contrast in self.contrasts:
            q, k, bank = queries[contrast.query], keys[contrast.key], negatives[contrast.key]
            terms[f"loss_{contrast.name}"] = sum(
                weight * info_nce(q[stage], k[stage], bank[stage], self.temperature) for stage, weight in self.weights.items()
            )
        return {"loss": sum(terms.values()), **terms}

    @torch.no_grad()
    def enqueue(self, keys: Levels) -> None:
        """Enqueue every branch's (world * B, D) keys of the global batch, stage by stage."""
        for branch, stages in keys.items():
            for stage, k in stages.items():
                self.queues[branch][stage].enqueue(k)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.heads, self.heads_k)]
