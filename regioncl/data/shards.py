"""WebDataset shards: images + proposals packed together, and the training reader over them.

A shard is a plain WebDataset tar: per sample ``{key}.{jpg|png|bmp|webp}`` (the original file's
bytes, never re-encoded) and ``{key}.json`` ``{"width", "height", "boxes": [[x1, y1, x2, y2],
...], "proposals": {settings}}`` with boxes in original pixels. Members carry mtime 0 and fixed
owner/mode, so the same proposals give a byte-identical shard.

``ShardStream`` reads shards by random access (the tar headers give each member's offset)
instead of streaming them, so that one global permutation per (seed, epoch) can be dealt out
to every rank and DataLoader worker: disjoint, complete, equal-sized within one sample, and the
same whatever happened before.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from regioncl.data.proposals_file import read_proposals
from regioncl.data.sources import SUPPORTED_FORMATS, UnreadableImage, decode_rgb
from regioncl.io import atomic_path
from regioncl.progress import Progress

_IMAGE_EXTENSIONS = frozenset(SUPPORTED_FORMATS.values())
_TAR_BLOCK = 512


def write_shard(proposals_parquet: Path, out_tar: Path) -> int:
    """Pack every image of a proposals chunk with its boxes into ``out_tar``; returns the sample count.

    Samples are in key order. Raises if an image's header no longer matches the size recorded
    with its proposals (the file changed since the proposals were computed).
    """
    rows, settings = read_proposals(proposals_parquet)
    rows.sort(key=lambda row: row["key"])
    with atomic_path(out_tar) as tmp, open(tmp, "wb") as stream:
        # mtime=0 and fixed owner/mode make the tar a function of its contents; PAX allows keys
        # longer than ustar's 100-character names (and equals ustar when they are short).
        writer = wds.TarWriter(
            stream, encoder=False, mtime=0, user="regioncl", group="regioncl", format="PAX_FORMAT"
        )
        with writer:
            progress = Progress(len(rows), desc=f"shard {Path(out_tar).name} (images)")
            for done, row in enumerate(rows, start=1):
                data = Path(row["path"]).read_bytes()
                meta = {
                    "width": row["width"],
                    "height": row["height"],
                    "boxes": row["boxes"].tolist(),
                    "proposals": settings,
                }
                writer.write(
                    {
                        "__key__": row["key"],
                        _checked_extension(data, row, proposals_parquet): data,
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
                progress.update(done)
            progress.close()
    return len(rows)


def _checked_extension(data: bytes, row: dict[str, Any], proposals_parquet: Path) -> str:
    """The real format's extension of an image file, after checking it is still the file whose
    size the proposals recorded (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
    except (OSError, SyntaxError, ValueError) as err:
        raise RuntimeError(
            f"{row['path']} (key {row['key']} in {proposals_parquet}) no longer opens as an image ({err}); "
            f"it changed since its proposals were computed: re-run the proposals stage"
        ) from err
    if fmt not in SUPPORTED_FORMATS or size != (row["width"], row["height"]):
        raise RuntimeError(
            f"{row['path']} (key {row['key']} in {proposals_parquet}) is now a {fmt} of "
            f"{size[0]}x{size[1]} px, its proposals were computed on {row['width']}x{row['height']} px; "
            f"re-run the proposals stage"
        )
    return SUPPORTED_FORMATS[fmt]


class CorruptShardError(RuntimeError):
    """A shard that cannot be read as the writer wrote it."""


def _corrupt(shard: str, detail: str) -> CorruptShardError:
    return CorruptShardError(
        f"shard {shard} is truncated or corrupt ({detail}); delete it and re-run the workflow to rebuild it"
    )


@dataclass(frozen=True)
class ShardIndex:
    """Where every sample of a set of shards lives; arrays of length N, sorted by key."""

    shards: tuple[str, ...]
    shard: np.ndarray  # (N,) int32: index into ``shards``
    keys: np.ndarray  # (N,) bytes (UTF-8 keys); numpy bytes arrays stay compact at ImageNet scale
    image_offset: np.ndarray  # (N,) int64 byte offset of the image member's data
    image_size: np.ndarray  # (N,) int64
    json_offset: np.ndarray  # (N,) int64
    json_size: np.ndarray  # (N,) int64

    @classmethod
    def build(cls, shards: Sequence[str | Path]) -> ShardIndex:
        names = tuple(str(shard) for shard in shards)
        if not names:
            raise ValueError("ShardStream needs at least one shard")
        records = [(i, *member) for i, name in enumerate(names) for member in _scan_shard(name)]
        columns = list(zip(*records))
        keys = np.array([key.encode("utf-8") for key in columns[1]], dtype=np.bytes_)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        duplicate = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if len(duplicate):
            first, second = order[duplicate[0]], order[duplicate[0] + 1]
            raise ValueError(
                f"sample key {sorted_keys[duplicate[0]].decode()!r} is in both {names[columns[0][first]]} "
                f"and {names[columns[0][second]]}; each image must be in exactly one shard"
            )
        return cls(
            shards=names,
            shard=np.asarray(columns[0], dtype=np.int32)[order],
            keys=sorted_keys,
            image_offset=np.asarray(columns[2], dtype=np.int64)[order],
            image_size=np.asarray(columns[3], dtype=np.int64)[order],
            json_offset=np.asarray(columns[4], dtype=np.int64)[order],
            json_size=np.asarray(columns[5], dtype=np.int64)[order],
        )


def _scan_shard(shard: str) -> list[tuple[str, int, int, int, int]]:
    """``(key, image offset, image size, json offset, json size)`` per sample, from tar headers
    only; checks every sample is complete and the archive ends with its end-of-archive blocks."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with open(shard, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for info in tar:
                key, _, extension = info.name.partition(".")
                if not info.isfile():
                    raise _corrupt(shard, f"member {info.name!r} is not a regular file")
                members.setdefault(key, {})[extension] = info
            # tarfile stops silently at a truncated or garbled header; a complete archive has two
            # zero blocks right after the last member.
            stream.seek(tar.offset)
            if stream.read(2 * _TAR_BLOCK) != bytes(2 * _TAR_BLOCK):
                raise _corrupt(shard, f"no end-of-archive marker at byte {tar.offset}")
    except (tarfile.TarError, OSError) as err:
        raise _corrupt(shard, f"{type(err).__name__}: {err}") from err
    if not members:
        raise _corrupt(shard, "no samples")
    samples = []
    for key, parts in members.items():
        images = [parts[ext] for ext in parts if ext in _IMAGE_EXTENSIONS]
        if "json" not in parts or len(images) != 1 or len(parts) != 2:
            found = ", ".join(sorted(parts))
            raise _corrupt(shard, f"sample {key!r} has members {found}; expected one image and 'json'")
        image, meta = images[0], parts["json"]
        samples.append((key, image.offset_data, image.size, meta.offset_data, meta.size))
    return samples


class ShardStream(torch.utils.data.IterableDataset):
    """Training samples from shards, dealt out by rank and DataLoader worker.

    Each epoch, all N samples are permuted by a generator seeded with ``(seed, epoch)``; sample
    ``i`` of the permutation goes to rank ``i % world_size`` and, within it, to DataLoader worker
    ``(i // world_size) % num_workers``. So ranks and workers get disjoint samples whose union is
    every sample; ranks' counts differ by at most one, as do a rank's workers'; and since a
    DataLoader takes items from its workers round-robin, a rank sees ``permutation[rank::
    world_size]`` in that order whatever ``num_workers`` is. An epoch's order depends on
    ``(seed, epoch)`` only; the permutation is over samples sorted by key, so it does not depend
    on the order or spelling of ``shards`` either.

    Yields ``{"key": str, "image": PIL RGB image, "boxes": (K, 4) float32 x1y1x2y2 image px,
    "width": int, "height": int}``. Call ``set_epoch`` before iterating each epoch; with
    ``persistent_workers=True`` the workers keep their own copy and would not see it, so leave
    persistent workers off.

    Resuming mid-epoch: ``set_epoch(epoch, skip=n)`` drops the first ``n`` samples of this
    rank's order (``permutation[rank::world_size]``) before the worker split, without reading
    them; the rank then sees exactly the samples an uninterrupted epoch would have yielded after
    its first ``n``, in the same order, whatever ``num_workers`` is.
    """

    def __init__(
        self, shards: Sequence[str | Path], *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(
                f"ShardStream: rank must be in [0, {world_size - 1}] for world_size={world_size}, got {rank}"
            )
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0
        self.index = ShardIndex.build(shards)

    @property
    def num_samples(self) -> int:
        """Samples over all shards (all ranks together)."""
        return len(self.index.keys)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank gets in a full epoch (ranks differ by at most one)."""
        return len(range(self.rank, self.num_samples, self.world_size))

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch ``epoch`` next, starting after the first ``skip`` samples of this rank's
        order (0 = the whole epoch)."""
        if not 0 <= skip <= self.samples_per_rank:
            raise ValueError(
                f"ShardStream.set_epoch: skip must be in [0, {self.samples_per_rank}] (this rank's samples "
                f"per epoch), got {skip}"
            )
        self.epoch = epoch
        self.skip = skip

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) int64: the epoch's permutation of the key-sorted samples."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(self.num_samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        rank_order = self.epoch_order(self.epoch)[self.rank :: self.world_size]
        # Skipping before the worker split keeps the DataLoader's round-robin over workers equal
        # to the rank order: worker 0 holds the first remaining sample.
        mine = rank_order[self.skip :][worker_id::num_workers]
        for sample in mine:
            yield self.load(int(sample))

    def load(self, sample: int) -> dict[str, Any]:
        """Sample ``sample`` of the key-sorted index, decoded."""
        index = self.index
        shard = index.shards[index.shard[sample]]
        key = index.keys[sample].decode("utf-8")
        try:
            with open(shard, "rb") as stream:
                stream.seek(index.json_offset[sample])
                meta_bytes = stream.read(index.json_size[sample])
                stream.seek(index.image_offset[sample])
                image_bytes = stream.read(index.image_size[sample])
        except OSError as err:
            raise _corrupt(shard, f"cannot read sample {key!r}: {err}") from err
        if len(meta_bytes) != index.json_size[sample] or len(image_bytes) != index.image_size[sample]:
            raise _corrupt(shard, f"sample {key!r} is cut short")
        try:
            meta = json.loads(meta_bytes)
            width, height = int(meta["width"]), int(meta["height"])
            boxes = np.asarray(meta["boxes"], dtype=np.float32).reshape(-1, 4)
            image, _ = decode_rgb(image_bytes, check_jpeg_scan=False)  # admitted by the proposal stage
        except (ValueError, KeyError, TypeError, UnreadableImage) as err:
            raise _corrupt(shard, f"sample {key!r}: {type(err).__name__}: {err}") from err
        if image.size != (width, height):
            raise _corrupt(shard, f"sample {key!r} image is {image.size}, its json says {(width, height)}")
        return {"key": key, "image": image, "boxes": boxes, "width": width, "height": height}
