"""Typed pretraining settings, parsed once from the run's config dict (unknown keys rejected by name)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from regioncl.methods.base import get_method
from regioncl.settings import Settings, bounded


@dataclass(frozen=True)
class OptimizerSettings(Settings):
    name: Literal["sgd", "lars"] = "sgd"
    base_lr: float = bounded(0.03, ge=0)  # at ``reference_batch``; lr = base_lr * batch_size / reference_batch
    reference_batch: int = bounded(256, ge=1)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(1e-4, ge=0)


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """One pretraining run. ``batch_size`` is global (all ranks); each rank gets batch_size / world_size."""

    section: ClassVar[str] = "pretrain"

    method: str
    epochs: int
    # The method's registered params dataclass (e.g. MocoV2Params), typed by ``field_types``;
    # None: the method's defaults.
    method_params: Any = None
    arch: str = "resnet50"
    batch_size: int = 256
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    warmup_epochs: float = 0.0  # linear warmup, then cosine decay (regioncl.engine.schedule)
    # Details the papers leave open and the released codes fix (spec_soco.md: SoCo warms up from
    # lr/100 and decays to 1e-6; spec_plrc.md: MoCo's code sets the lr once per epoch):
    # the warmup's first lr as a fraction of the lr (None: lr / warmup steps), the cosine's floor,
    # and whether the lr changes every step or at each epoch's start.
    warmup_start_factor: float | None = bounded(None, gt=0, le=1)
    final_lr: float = bounded(0.0, ge=0)
    lr_update: Literal["step", "epoch"] = "step"
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
    # Where colour jitter, grayscale, blur and solarize are rendered: "worker" (PIL, in the
    # DataLoader workers) or "device" (batched on the training device; recommended on GPUs).
    # The draws and the geometry are the same in both (regioncl.augment).
    photometric: Literal["worker", "device"] = "worker"

    def __post_init__(self) -> None:
        params_type = get_method(self.method).Params
        if self.method_params is None:
            object.__setattr__(self, "method_params", params_type())
        if not isinstance(self.method_params, params_type):
            raise TypeError(f"method_params: expected {params_type.__name__}, got {type(self.method_params).__name__}")
        for name in (
            "epochs", "batch_size", "checkpoint_every_steps", "keep_checkpoints", "log_every", "accumulate_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {self.num_workers}")

    @classmethod
    def field_types(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {"method_params": get_method(data["method"]).Params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> PretrainSettings:
        if "crop_size" in data:
            method = get_method(data["method"])
            raise ValueError(
                f"pretrain.crop_size: view sizes moved into each method's parameters; set them under "
                f"`methods.{method.name}` (or a run's `method_params`): {method.name} takes "
                f"{list(method.pixel_params) or 'no view size'}"
            )
        return super().from_dict(data, where)
