"""Where a stage computes: the ``device`` setting shared by pretraining and the torchvision
transfer backend (``auto``: the GPU when torch sees one, else the CPU)."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def wants_cuda(device: str, where: str = "device") -> bool:
    """Whether a ``device`` setting (``auto``: the GPU when torch sees one, ``cpu``, ``cuda``)
    means CUDA here; ``cuda`` on a machine without a GPU is an error naming ``where``."""
    if device not in DEVICES:
        raise ValueError(f"{where}: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{where}: 'cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "expected 'auto' or 'cpu' on this machine"
        )
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())
