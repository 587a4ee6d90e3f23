"""Resumable checkpoints in the run's workdir (the pretrained checkpoint is ``regioncl.weights``'s).

A resumable checkpoint is ``checkpoint_{step:08d}.pt`` (a plain ``torch.save`` file) plus
``checkpoint_{step:08d}.pt.sha256``, written after it: a checkpoint without a matching checksum
(the save was cut short, or the file was damaged since) is skipped on resume, with a message,
and the previous one is used.

Checkpoints hold only tensors and plain values (RNG states included), so they are read with
``torch.load(weights_only=True)``: the checksum guards against damage, not against a planted
file (anyone can recompute it), and a pickle that would run code is refused unread. Nothing
with a NaN or inf is written: a diverged run stops instead of leaving a checkpoint that looks
fine. ``lock_workdir`` keeps a second process out of a workdir in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import pickle
import random
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regioncl.io import write_bytes_atomic, write_text_atomic
from regioncl.weights import check_finite

RESUME_FORMAT = "regioncl.resume/2"  # /2: RNG states as tensors and plain values
LOCK_NAME = ".lock"  # in the workdir, held by the run training there (lock_workdir)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why."""


class WorkdirBusyError(RuntimeError):
    """Another process holds a workdir's lock."""


def checkpoint_path(workdir: Path, step: int) -> Path:
    return workdir / f"checkpoint_{step:08d}.pt"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_resume_checkpoint(workdir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically, then delete all but the newest ``keep`` checkpoints.

    Raises FloatingPointError, writing nothing, if a tensor of ``state`` holds a NaN or inf."""
    check_finite(state, f"checkpoint at step {step}")
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
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"refused: it holds objects other than tensors and plain values ({error})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
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
    """Every global RNG's state as tensors and plain values (what ``weights_only`` loads)."""
    bit_generator, key, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {
        "bit_generator": bit_generator,
        "key": torch.from_numpy(key.astype(np.int64)),  # the uint32 words, exact in int64
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def lock_workdir(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``workdir`` (``flock`` on ``workdir/.lock``) for the block.

    Two runs in one workdir would interleave their metrics and overwrite each other's
    checkpoints; the second raises WorkdirBusyError naming the workdir and the holder's pid.
    The lock goes with the process, so a killed run leaves no stale lock behind."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise WorkdirBusyError(
                f"{workdir}: another process (pid {holder}) is training in this workdir; "
                "wait for it to finish or use another workdir"
            ) from error
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
