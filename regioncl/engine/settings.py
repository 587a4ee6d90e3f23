"""Typed pretraining settings, parsed once from the run's config dict (unknown keys rejected by name)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from regioncl.methods.base import get_method
from regioncl.settings import _coerce, from_dict_strict, to_plain_dict


@dataclass(frozen=True)
class OptimizerSettings:
    name: Literal["sgd", "lars"] = "sgd"
    base_lr: float = 0.03  # at ``reference_batch``; lr = base_lr * batch_size / reference_batch
    reference_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class PretrainSettings:
    """One pretraining run. ``batch_size`` is global (all ranks); each rank gets batch_size / world_size."""

    method: str
    epochs: int
    method_params: Any  # the method's registered params dataclass (e.g. MocoV2Params)
    arch: str = "resnet50"
    batch_size: int = 256
    crop_size: int = 224
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    warmup_epochs: float = 0.0  # linear warmup, then cosine decay to 0, both per step
    num_workers: int = 2
    seed: int = 0
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # BN statistics over the global batch (all ranks), in online and momentum encoders alike.
    sync_bn: bool = False
    # Optimizer steps of ``batch_size`` made of this many micro-batches per rank (the loss is
    # averaged over them): a paper's global batch on fewer devices.
    accumulate_steps: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype; fp16 adds a GradScaler
    channels_last: bool = False  # NHWC convolutions (faster on GPUs with tensor cores)

    def __post_init__(self) -> None:
        params_type = get_method(self.method).Params
        if not isinstance(self.method_params, params_type):
            raise TypeError(f"method_params: expected {params_type.__name__}, got {type(self.method_params).__name__}")
        for name in (
            "epochs", "batch_size", "crop_size", "checkpoint_every_steps", "keep_checkpoints", "log_every", "accumulate_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {self.num_workers}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PretrainSettings:
        if "method" not in data:
            raise KeyError("pretrain.method: required (a registered method name)")
        params_type = get_method(data["method"]).Params
        params = from_dict_strict(params_type, data.get("method_params", {}), "pretrain.method_params")
        rest = {key: value for key, value in data.items() if key != "method_params"}
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(rest) - set(names))
        if unknown:
            raise ValueError(f"pretrain: unknown key(s) {unknown}; expected some of {names}")
        if "epochs" not in rest:
            raise KeyError("pretrain.epochs: required")
        values = {name: _coerce(value, hints[name], f"pretrain.{name}") for name, value in rest.items()}
        return cls(method_params=params, **values)

    def to_dict(self) -> dict[str, Any]:
        return to_plain_dict(self)
