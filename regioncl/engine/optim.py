"""Optimizers: SGD (MoCo) and LARS (BYOL, SoCo), with the linear LR scaling rule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from regioncl.engine.settings import OptimizerSettings


def scaled_lr(settings: OptimizerSettings, batch_size: int) -> float:
    """Linear scaling (Goyal et al. 2017): lr = base_lr * global batch / reference batch."""
    return settings.base_lr * batch_size / settings.reference_batch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor update is scaled by the trust ratio (You et al. 2017):

        g <- g + wd * w;   g <- g * eta * ||w|| / ||g||   (1 where a norm is 0);   v <- mu * v + g;   w <- w - lr * v

    Groups with ``exclude=True`` (biases and norm layers, as in BYOL) skip weight decay and the ratio.
    """

    def __init__(self, params, *, lr: float, momentum: float, weight_decay: float, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=False))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not group["exclude"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                    param_norm, grad_norm = param.norm(), grad.norm()
                    trust = torch.where((param_norm > 0) & (grad_norm > 0), group["eta"] * param_norm / grad_norm, 1.0)
                    grad = grad * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, settings: OptimizerSettings, batch_size: int) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters (momentum targets have requires_grad=False)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(settings, batch_size)
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    # LARS: 1-D tensors (biases, BN affine) are excluded from adaptation and weight decay.
    groups = [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "exclude": True, "weight_decay": 0.0},
    ]
    return LARS(groups, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
