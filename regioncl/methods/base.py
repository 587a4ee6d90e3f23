"""What every pretraining method is to the engine, and the registry that names them.

The engine knows nothing of views: it asks the method to turn one sample into views
(``make_views``, in DataLoader workers), a list of those into a batch (``collate``), and a
batch into a loss dict (``forward``); after each optimizer step it calls ``update_momentum``,
which moves every declared (online, target) pair by EMA. Queues are registered buffers, so the
state dict carries them into checkpoints. ``transfer_state`` says what the pretrained
checkpoint exports.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from regioncl.models.momentum import ema_update_


@dataclass(frozen=True)
class StepInfo:
    """Where training is, for schedules and switches inside a method (e.g. PLRC's warm-up)."""

    step: int  # optimizer steps done before this one
    epoch: int
    steps_per_epoch: int
    total_steps: int
    seed: int  # the run's seed, for randomness that must agree across ranks (shuffle-BN)


def pad_ragged(items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (K_i, ...) tensors into (B, K_max, ...) zero-padded, with a (B, K_max) bool validity mask."""
    longest = max((item.shape[0] for item in items), default=0)
    trailing = items[0].shape[1:]
    padded = items[0].new_zeros((len(items), longest, *trailing))
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for row, item in enumerate(items):
        padded[row, : item.shape[0]] = item
        mask[row, : item.shape[0]] = True
    return padded, mask


class PretrainMethod(nn.Module, abc.ABC):
    """Base of all methods. A subclass sets ``Params`` (its hyperparameter dataclass) and is registered by name."""

    name: ClassVar[str]
    Params: ClassVar[type]
    # Keys of ``make_views`` output whose first dimension varies per sample (boxes, points):
    # collated by ``pad_ragged`` into ``key`` (B, K_max, ...) and ``key + "_mask"`` (B, K_max).
    ragged_keys: ClassVar[frozenset[str]] = frozenset()
    # DDP must search for unused parameters when a method's loss skips some (e.g. a switch by epoch).
    find_unused_parameters: ClassVar[bool] = False
    # Fields of ``Params`` that are sizes in view pixels (view sizes, window sizes), set for the
    # papers' 224-px views; ``scaled_params`` scales them together (benchmarks, toy runs).
    pixel_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any, *, arch: str) -> None:
        super().__init__()
        self.params = params
        self.arch = arch

    @classmethod
    def scaled_params(cls, params: Any, scale: float) -> Any:
        """``params`` with every ``pixel_params`` field multiplied by ``scale`` (rounded to whole px)."""
        return dataclasses.replace(params, **{name: max(1, round(getattr(params, name) * scale)) for name in cls.pixel_params})

    @abc.abstractmethod
    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """One ShardStream sample -> named view tensors and annotations; all randomness from ``rng``."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any], step_info: StepInfo) -> dict[str, torch.Tensor]:
        """A collated batch -> {"loss": scalar to minimize, other scalars to log}."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if key in self.ragged_keys:
                batch[key], batch[f"{key}_mask"] = pad_ragged([torch.as_tensor(v) for v in values])
            else:
                batch[key] = default_collate(values)
        return batch

    @abc.abstractmethod
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs whose targets follow the online modules by EMA."""

    @abc.abstractmethod
    def momentum_at(self, step_info: StepInfo) -> float:
        """The EMA coefficient m for this step (constant for MoCo, cosine-increasing for BYOL)."""

    @torch.no_grad()
    def update_momentum(self, step_info: StepInfo) -> None:
        momentum = self.momentum_at(step_info)
        for online, target in self.momentum_pairs():
            ema_update_(target, online, momentum)

    def chance_loss(self) -> float | None:
        """The loss of a model that has learned nothing (drawn on the loss curves), or None
        where the method has no such level (a regression loss such as BYOL's)."""
        return None

    def transfer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(backbone state dict in torchvision ResNet names without fc.*, {extra module: state dict})."""
        return self.backbone.state_dict(), {}


METHODS: dict[str, type[PretrainMethod]] = {}


def register_method(name: str) -> Callable[[type[PretrainMethod]], type[PretrainMethod]]:
    def register(cls: type[PretrainMethod]) -> type[PretrainMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


# Importing this module runs the package's __init__ first, which imports (and so registers)
# every built-in method: the registry is complete whenever these are callable.
def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[PretrainMethod]:
    if name not in METHODS:
        raise KeyError(f"method: {name!r} is not registered; registered: {sorted(METHODS)}")
    return METHODS[name]
