"""Resumable checkpoints in the run's workdir, and the pretrained checkpoint (docs/architecture.md).

A resumable checkpoint is ``checkpoint_{step:08d}.pt`` (a plain ``torch.save`` file) plus
``checkpoint_{step:08d}.pt.sha256``, written after it: a checkpoint without a matching checksum
(the save was cut short, or the file was damaged since) is skipped on resume, with a message,
and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regioncl.io import atomic_path, write_bytes_atomic, write_text_atomic

RESUME_FORMAT = "regioncl.resume/1"
PRETRAINED_FORMAT = "regioncl.pretrained/1"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why."""


def checkpoint_path(workdir: Path, step: int) -> Path:
    return workdir / f"checkpoint_{step:08d}.pt"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_resume_checkpoint(workdir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically, then delete all but the newest ``keep`` checkpoints."""
    buffer = io.BytesIO()
    torch.save({"format": RESUME_FORMAT, **state}, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(workdir, step)
    write_bytes_atomic(path, data)
    write_text_atomic(_checksum_path(path), hashlib.sha256(data).hexdigest() + "\n")
    for old in sorted(workdir.glob("checkpoint_*.pt"))[:-keep]:
        _checksum_path(old).unlink(missing_ok=True)
        old.unlink()
    return path


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    checksum = _checksum_path(path)
    if not checksum.exists():
        raise CheckpointError(f"{checksum.name} is missing (the save did not finish)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != checksum.read_text().strip():
        raise CheckpointError("sha256 does not match the stored checksum (truncated or damaged)")
    try:
        # Our own file from our own workdir: it holds RNG states (numpy, python) besides tensors.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"torch.load failed: {error}") from error
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"format: expected {RESUME_FORMAT!r}")
    return state


def load_latest_checkpoint(workdir: Path, report: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The newest valid checkpoint in ``workdir`` and its path, or None; skipped ones are reported."""
    for path in sorted(workdir.glob("checkpoint_*.pt"), reverse=True):
        try:
            return read_resume_checkpoint(path), path
        except CheckpointError as error:
            report(f"skipping checkpoint {path}: {error}")
    return None


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """The contract file: format, method, arch, steps, epochs, backbone, transfer, config."""
    on_cpu = {key: value.detach().cpu() for key, value in backbone.items()}
    transfer_cpu = {name: {k: v.detach().cpu() for k, v in sd.items()} for name, sd in transfer.items()}
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
