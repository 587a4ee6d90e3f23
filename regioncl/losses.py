"""Self-supervised losses, each with its paper formula; tests check them against hand-computed values."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with a queue of negatives (MoCo, eq. 1), averaged over the batch.

        L_i = -log( exp(q_i . k_i / tau) / (exp(q_i . k_i / tau) + sum_j exp(q_i . n_j / tau)) )

    q: (N, D) queries, k: (N, D) their positive keys, queue: (K, D) negatives n_j; all
    L2-normalized by the caller. ``k`` and ``queue`` should carry no gradient (MoCo detaches them).
    """
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    negatives = q @ queue.T  # (N, K)
    logits = torch.cat([positive, negatives], dim=1) / temperature  # (N, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    return F.cross_entropy(logits, labels)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalized MSE (eq. 2), averaged over the batch: 2 - 2 * <p/||p||, z/||z||>.

    p: (N, D) online predictions; z: (N, D) target projections (no gradient).
    """
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()
