"""The weights files that pass between stages, each read and written here alone
(docs/architecture.md):

- the pretrained checkpoint (``checkpoint_final.pt``, ``PRETRAINED_FORMAT``): what pretraining
  writes and ``convert`` reads;
- torchvision weights (``{run}.tv.pth``, ``TORCHVISION_FORMAT``): a detection state dict;
- detectron2 weights (``{run}.d2.pkl``): detectron2's model-zoo pickle ``{"model": {name: numpy
  array}, "__author__": str, "matching_heuristics": bool, "method": str, "arch": str}``.
- a torchvision classification state dict (``*.pth``, ``{name: tensor}``, e.g. an
  ImageNet-supervised ResNet's): what ``convert`` reads for the ``supervised`` baseline.

Torch files hold only tensors and plain values and are read with ``weights_only=True``.
Unpickling can call anything a file names, and weights files are passed around, so the
detectron2 pickle is read by an unpickler that admits only numpy arrays, dtypes and scalars in
plain containers and refuses any other global by name before it is called. Nothing with a NaN
or inf is written (``check_finite``). ``check_same_run`` is the one test that a stage's
resumable checkpoint belongs to the run about to resume it.
"""

from __future__ import annotations

import codecs
import collections
import pickle
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy._core import multiarray, numeric

from regioncl.archs import ARCHS
from regioncl.io import atomic_path

PRETRAINED_FORMAT = "regioncl.pretrained/1"
TORCHVISION_FORMAT = "regioncl.torchvision/1"
PRETRAINED_FIELDS = ("method", "arch", "backbone", "transfer")

# (module, name) a numpy array pickle refers to -> the object; numpy 1 wrote `numpy.core.*`.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
    **{(f"numpy.{core}.multiarray", "_reconstruct"): multiarray._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): multiarray.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): numeric._frombuffer for core in ("core", "_core")},
}


class WeightsFormatError(ValueError):
    """A weights file is not of the format its reader expects; the message names the file."""


class UnsafeWeightsError(pickle.UnpicklingError):
    """A weights pickle refers to something other than numpy arrays and plain values."""


# -- what is written --------------------------------------------------------------------------


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested ``state`` holding a NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def check_finite(state: Any, what: str) -> None:
    """Raise FloatingPointError naming the tensors of ``state`` that hold a NaN or inf."""
    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise FloatingPointError(f"{what}: non-finite values in {len(bad)} tensor(s) ({shown}); not written")


def _read_torch(path: Path, expected_format: str) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise WeightsFormatError(f"{path}: format is {found!r}, expected {expected_format!r}")
    return payload


# -- the pretrained checkpoint ----------------------------------------------------------------


def write_pretrained_checkpoint(
    out: Path,
    *,
    method: str,
    arch: str,
    steps: int,
    epochs: int,
    backbone: dict[str, torch.Tensor],
    transfer: dict[str, dict[str, torch.Tensor]],
    config: dict[str, Any],
) -> None:
    """The contract file: format, method, arch, steps, epochs, backbone, transfer, config.

    Raises FloatingPointError, writing nothing, if a weight holds a NaN or inf."""
    on_cpu = {key: value.detach().cpu() for key, value in backbone.items()}
    transfer_cpu = {name: {k: v.detach().cpu() for k, v in sd.items()} for name, sd in transfer.items()}
    check_finite({"backbone": on_cpu, "transfer": transfer_cpu}, f"pretrained weights after step {steps}")
    state = {
        "format": PRETRAINED_FORMAT,
        "method": method,
        "arch": arch,
        "steps": steps,
        "epochs": epochs,
        "backbone": on_cpu,
        "transfer": transfer_cpu,
        "config": config,
    }
    with atomic_path(out) as tmp:
        torch.save(state, tmp)


def read_pretrained_checkpoint(path: Path) -> dict[str, Any]:
    """A pretrained checkpoint, checked to have the format, the fields and a known arch."""
    checkpoint = _read_torch(path, PRETRAINED_FORMAT)
    for name in PRETRAINED_FIELDS:
        if name not in checkpoint:
            raise WeightsFormatError(f"{path}: missing field {name!r}")
    if checkpoint["arch"] not in ARCHS:
        raise WeightsFormatError(f"{path}: arch {checkpoint['arch']!r} is not one of {', '.join(ARCHS)}")
    return checkpoint


# -- torchvision weights (.tv.pth) ------------------------------------------------------------


def write_torchvision_weights(out: Path, *, arch: str, method: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(out) as tmp:
        torch.save(
            {
                "format": TORCHVISION_FORMAT,
                "arch": arch,
                "method": method,
                "state_dict": {k: v.contiguous() for k, v in state_dict.items()},
            },
            tmp,
        )


def read_torchvision_weights(path: Path, arch: str, reader: str) -> dict[str, Any]:
    """Converted torchvision weights ``{format, arch, method, state_dict}``, checked to be of
    ``arch`` (what ``reader``, e.g. "the benchmark", builds)."""
    payload = _read_torch(path, TORCHVISION_FORMAT)
    if payload.get("arch") != arch:
        raise WeightsFormatError(f"{path}: arch is {payload.get('arch')!r}, {reader} expects {arch!r}")
    return payload


# -- detectron2 weights (.d2.pkl) -------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, handle: Any, path: Path) -> None:
        super().__init__(handle, encoding="latin1")  # as detectron2 reads Python 2 model-zoo files
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafeWeightsError(
                f"{self.path}: refers to {module}.{name}; a detectron2 weights file may hold only "
                "numpy arrays and plain values (refused before anything in it ran)"
            )
        return ALLOWED_GLOBALS[(module, name)]


def write_detectron2_weights(out: Path, weights: Mapping[str, Any]) -> None:
    """detectron2 weights ``{"model": {name: array}, ...}``; tensors are stored as numpy arrays."""
    model = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in weights["model"].items()}
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        pickle.dump({**weights, "model": model}, handle)


def read_detectron2_weights(path: Path) -> dict[str, Any]:
    """The weights dict of ``path``; raises UnsafeWeightsError for anything but arrays and plain values."""
    with open(path, "rb") as handle:
        weights = _NumpyOnlyUnpickler(handle, Path(path)).load()
    if not isinstance(weights, dict) or not isinstance(weights.get("model"), dict):
        raise WeightsFormatError(f"{path}: expected detectron2 weights, a dict with a 'model' dict of arrays")
    return weights


# -- torchvision classification state dicts (.pth) --------------------------------------------


def read_classification_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict of a torchvision classification model saved with
    ``torch.save(model.state_dict(), path)``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (a torchvision classification state dict .pth)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # e.g. a training checkpoint holding its argparse args
        raise WeightsFormatError(f"{path}: not a plain state dict of tensors ({error})") from error
    if not isinstance(payload, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        found = list(payload)[:5] if isinstance(payload, Mapping) else type(payload).__name__
        raise WeightsFormatError(
            f"{path}: expected a state dict {{name: tensor}} as torch.save(model.state_dict()) writes; "
            f"found {found} (a training checkpoint: save its model's state dict alone)"
        )
    return dict(payload)


# -- resumable checkpoints --------------------------------------------------------------------


def check_same_run(path: Path, stored: Mapping[str, Any], current: Mapping[str, Any], may_change: Collection[str] = ()) -> None:
    """Refuse to resume the checkpoints at ``path`` when the identity they were written for
    (``stored``) differs from this run's (``current``) in a key other than ``may_change``:
    they belong to another run (changed settings, or files put there by hand)."""
    differ = sorted(k for k in stored.keys() | current.keys() if k not in may_change and stored.get(k) != current.get(k))
    if differ:
        found = {k: stored.get(k) for k in differ}
        expected = {k: current.get(k) for k in differ}
        raise ValueError(
            f"{path}: holds checkpoints of another run ({found}; this run has {expected}); "
            "use another workdir or delete it"
        )
