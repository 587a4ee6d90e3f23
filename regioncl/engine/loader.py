"""From a rank's shard stream to its batches of views, deterministic whatever the worker layout.

Each sample's augmentations draw from an rng seeded by (run seed, epoch, sample key), so a
sample gets the same views in any worker, in any process, before and after a resume. A resume
in the middle of an epoch re-creates the epoch's stream with the consumed samples skipped by
the shard reader itself (``ShardStream.set_epoch(epoch, skip=n)``): they are never read,
decoded or augmented, and the next sample is the one an uninterrupted run would take next.

Workers emit views as uint8 (``regioncl.augment.view_output``: "worker" or "device"), a quarter
of float32's bytes through the worker queues and pinned memory; the training process finishes
them on its device (``regioncl.augment.finish_views``). Each worker keeps up to a whole step of
samples in flight (``make_loader``'s ``prefetch_factor``), so the workers fill the next step
while the device runs this one.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from regioncl.augment import ViewOutput, view_output
from regioncl.data.shards import ShardStream
from regioncl.device import one_thread_per_worker

MakeViews = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    key_hash = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key_hash])


class ViewStream(IterableDataset):
    """One item per sample of ``samples``: the method's views, as ``output`` asks
    (``regioncl.augment.view_output``; the engine's are "worker" and "device")."""

    def __init__(self, samples: ShardStream, make_views: MakeViews, seed: int, output: ViewOutput = "normalized") -> None:
        self.samples = samples
        self.make_views = make_views
        self.seed = seed
        self.output = output
        self.epoch = 0

    def start_epoch(self, epoch: int, skip_samples: int) -> None:
        """Call before creating the DataLoader iterator: workers copy the dataset when it starts.

        ``skip_samples``: how many of this rank's samples of the epoch were already trained on.
        """
        self.epoch = epoch
        self.samples.set_epoch(epoch, skip=skip_samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self.samples:
            with view_output(self.output):
                views = self.make_views(sample, sample_rng(self.seed, self.epoch, sample["key"]))
            yield views


def _keep_item(item: Any) -> Any:
    return item


def make_loader(views: ViewStream, num_workers: int, seed: int, *, step_items: int = 1) -> DataLoader:
    """Items one by one (batched in the main process, so per-worker leftovers never make short batches).

    ``step_items``: samples one optimizer step takes on this rank; each worker prefetches its
    share of a step (at least torch's default 2), so a step's samples are ready when it starts.
    """
    return DataLoader(
        views,
        batch_size=None,
        collate_fn=_keep_item,
        num_workers=num_workers,
        prefetch_factor=max(2, math.ceil(step_items / num_workers)) if num_workers else None,
        worker_init_fn=one_thread_per_worker,
        # Worker base seeds come from this generator, not from the global torch RNG that resume restores.
        generator=torch.Generator().manual_seed(seed),
    )


def epoch_batches(
    loader: DataLoader,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    batch_size: int,
    first_batch: int,
    num_batches: int,
) -> Iterator[dict[str, Any]]:
    """Batches ``first_batch .. num_batches - 1`` of the epoch the loader's ViewStream was started on
    (with its first ``first_batch * batch_size`` samples skipped)."""
    items = iter(loader)
    for index in range(first_batch, num_batches):
        samples = list(itertools.islice(items, batch_size))
        if len(samples) < batch_size:
            raise RuntimeError(
                f"data: this rank's stream ended at batch {index} of {num_batches}; "
                "the shard reader gave this rank fewer than num_samples / world_size samples"
            )
        yield collate(samples)
