"""Shuffle-BN (MoCo, He et al. 2020, sec. 3.3): encode momentum-encoder inputs in a batch that
mixes every rank's images, so BN statistics cannot tell the query which key is its positive.

    all = all_gather(x)                          (world * B, ...) in rank order
    pi  = a random permutation of world * B      the same on every rank: seeded by (seed, step)
    y   = all_gather(encoder(all[pi[rank * B : (rank + 1) * B]]))      row i: image pi[i]
    out[pi] = y                                  back in image (rank) order

MoCo v2 encodes its keys this way; DetCo will encode its 9 patches per image the same way.
``inputs`` is a tensor or a dict / tuple / list of tensors sharing the first dimension B (this
rank's images, e.g. (B, 3, S, S) views and (B, 9, 3, s, s) patches); the encoder's output is a
tensor or such a structure with first dimension B (per-image outputs, e.g. multi-level maps).
With one process, or ``enabled=False``, each rank encodes its own images (one process: the
encoder on ``inputs``, nothing else).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from regioncl.models import gather

Tensors = Any  # a tensor, or a dict / tuple / list of Tensors


def rank_agreed_permutation(size: int, seed: int, step: int) -> torch.Tensor:
    """A permutation of range(size) that every rank draws alike without a broadcast (CPU, int64)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    return torch.randperm(size, generator=generator)


@torch.no_grad()
def shuffle_bn_encode(
    encoder: Callable[[Tensors], Tensors], inputs: Tensors, *, seed: int, step: int, enabled: bool = True
) -> tuple[Tensors, Tensors]:
    """(this rank's outputs, first dim B; all ranks' outputs, first dim world * B in rank order).

    Both are structures like the encoder's output, without gradient. ``seed``, ``step``: the
    run's seed and the optimizer step, which fix the permutation.
    """
    batch = _first_dim(inputs, "shuffle_bn_encode inputs")
    world = gather.world_size()
    if world == 1 or not enabled:
        outputs = encoder(inputs)
        _first_dim(outputs, "shuffle_bn_encode encoder output", expected=batch)
        return outputs, _map(gather.all_gather_no_grad, outputs)
    everyone = _map(gather.all_gather_no_grad, inputs)  # (world * B, ...)
    device = _leaves(inputs)[0].device
    permutation = rank_agreed_permutation(world * batch, seed, step).to(device)
    mine = permutation.view(world, batch)[gather.rank()]  # the images this rank encodes
    outputs = encoder(_map(lambda tensor: tensor[mine], everyone))
    _first_dim(outputs, "shuffle_bn_encode encoder output", expected=batch)
    shuffled = _map(gather.all_gather_no_grad, outputs)  # row i: image permutation[i]

    def unshuffle(tensor: torch.Tensor) -> torch.Tensor:
        ordered = torch.empty_like(tensor)
        ordered[permutation] = tensor
        return ordered

    ordered = _map(unshuffle, shuffled)
    start = gather.rank() * batch
    return _map(lambda tensor: tensor[start : start + batch], ordered), ordered


def _map(function: Callable[[torch.Tensor], torch.Tensor], tree: Tensors) -> Tensors:
    if isinstance(tree, torch.Tensor):
        return function(tree)
    if isinstance(tree, dict):
        return {key: _map(function, value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(function, value) for value in tree)
    raise _not_a_structure(tree)


def _leaves(tree: Tensors) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if not isinstance(tree, (dict, tuple, list)):
        raise _not_a_structure(tree)
    children = tree.values() if isinstance(tree, dict) else tree
    return [leaf for child in children for leaf in _leaves(child)]


def _not_a_structure(tree: Any) -> TypeError:
    return TypeError(f"shuffle_bn_encode: expected a tensor or a dict/tuple/list of tensors, got {type(tree).__name__}")


def _first_dim(tree: Tensors, what: str, expected: int | None = None) -> int:
    """The first dimension all tensors of ``tree`` share (and that it is ``expected``, if given)."""
    sizes = [tensor.shape[0] if tensor.dim() else None for tensor in _leaves(tree)]
    if not sizes or len(set(sizes)) != 1 or sizes[0] is None or (expected is not None and sizes[0] != expected):
        wanted = "one shared first dimension" if expected is None else f"first dimension {expected} (one row per image)"
        raise ValueError(f"{what}: expected tensors with {wanted}, got first dimensions {sizes}")
    return sizes[0]
