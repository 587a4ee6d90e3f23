"""Collectives used inside a method's forward (gathers for shuffle-BN and queues) and for logging.

With one process (no process group) each is the identity, so methods need no special case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (world_size * N, ...) in rank order, on every rank; no gradient."""
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a copy; for logging)."""
    if world_size() == 1:
        return tensor.detach().clone()
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced)
    return reduced / world_size()


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, on every rank. Backward: every rank's y fed every rank's loss, so
    dL/dx = sum over ranks of dL/dy -- another all-reduce of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced)
        return reduced

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        reduced = grad.clone()
        dist.all_reduce(reduced)
        return reduced


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, differentiable (gradients flow back to every rank's input)."""
    if world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)
