"""Batch normalization over the global batch of all ranks, on any device and backend.

torch.nn.SyncBatchNorm (torch 2.14) refuses CPU tensors, so gloo runs could not synchronize BN;
``CrossRankBatchNorm`` computes the statistics with two differentiable all-reduces instead:

    mean = sum_ranks sum_i x_i / N,    var = sum_ranks sum_i (x_i - mean)^2 / N     (N: global count)
    y = (x - mean) / sqrt(var + eps) * weight + bias;   running_var follows var * N / (N - 1)

(two passes, not E[x^2] - E[x]^2, so the variance does not cancel catastrophically). With one
process, or in eval mode, it is exactly ``nn.BatchNorm``. ``convert_sync_batchnorm`` swaps it in
for every BN layer on the CPU and uses torch's own SyncBatchNorm (NCCL, fused kernels) on GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from regioncl.models import gather


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (B, C) or (B, C, ...) inputs whose statistics span every rank's batch."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CrossRankBatchNorm: expected (B, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or gather.world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)  # broadcast (C,) over (B, C, ...)
        count = torch.tensor(float(input.numel() // input.shape[1]), device=input.device)
        total = gather.all_reduce_sum_with_grad(torch.cat([input.sum(dims), count.view(1)]))
        global_count = total[-1].detach()
        mean = total[:-1] / global_count  # (C,)
        centered = input - mean.view(shape)
        var = gather.all_reduce_sum_with_grad(centered.square().sum(dims)) / global_count  # (C,), biased
        output = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * global_count / (global_count - 1))
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        # nn.BatchNorm's rule: an exponential average, or the cumulative one when momentum is None.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm{1,2,3}d synchronized across ranks (same names, parameters, buffers)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        converted = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
                converted.weight.requires_grad_(module.weight.requires_grad)
                converted.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                converted.running_mean.copy_(module.running_mean)
                converted.running_var.copy_(module.running_var)
                converted.num_batches_tracked.copy_(module.num_batches_tracked)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
