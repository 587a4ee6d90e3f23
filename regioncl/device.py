"""Where a stage computes: the ``device`` setting shared by pretraining and the torchvision
transfer backend (``auto``: the GPU when torch sees one, else the CPU), and the threads of the
data loader processes that feed it."""

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


def one_thread_per_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per loader process, so that N workers use
    N cores instead of N times all of them, fighting the training process for the CPU."""
    del worker_id
    torch.set_num_threads(1)
