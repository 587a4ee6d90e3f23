"""Loader-only throughput of pretraining: decoded, augmented views per second, without a model.

    python benchmarks/loader.py [--images 96] [--workers 1 2] [--modes worker device]
                                [--methods moco_v2 byol] [--crop 224] [--batch 32]

Shards: ``--images`` ImageNet-like JPEGs (about 500 x 375, quality 90) cut from the photographs
scikit-image and matplotlib ship (astronaut, chelsea, coffee, rocket, ...), each with 8
proposal boxes, written to a temporary folder. For each method, worker count and
``photometric`` mode it runs the engine's own data path (``ViewStream`` -> ``make_loader`` ->
``epoch_batches`` with the method's ``collate``) over every image once and reports
images/s, views/s and CPU-seconds per image (workers' and this process's CPU time together:
``getrusage`` of the reaped workers plus this process). Then the training process's share on the
CPU: ``finish_views`` (uint8 -> float, normalise; in device mode the batched photometric too) on
one collated batch, milliseconds per batch, one torch thread.

A method runs at its paper view sizes scaled to ``--crop`` / 224 (224: the papers' views).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from regioncl.augment import finish_views
from regioncl.data.shards import ShardStream
from regioncl.engine.loader import ViewStream, epoch_batches, make_loader
from regioncl.methods import get_method

IMAGE_SIZE = (500, 375)  # a typical ImageNet image, w x h px
PROPOSALS_PER_IMAGE = 8


def shipped_photographs() -> list[Image.Image]:
    """RGB photographs that ship with scikit-image and matplotlib (no download)."""
    import matplotlib.cbook
    from skimage import data

    pictures = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    images = [Image.fromarray(np.ascontiguousarray(p[:, :, :3])) for p in pictures]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as stream:
        images.append(Image.open(stream).convert("RGB"))
    return images


def write_photo_shards(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of ~IMAGE_SIZE: random crops of the shipped photographs, resized, in one shard."""
    rng = np.random.default_rng(seed)
    sources = shipped_photographs()
    path = directory / "photos.tar"
    with wds.TarWriter(str(path)) as writer:
        for index in range(count):
            source = sources[index % len(sources)]
            scale = rng.uniform(0.6, 1.0)
            w, h = int(source.width * scale), int(source.height * scale)
            x, y = int(rng.integers(0, source.width - w + 1)), int(rng.integers(0, source.height - h + 1))
            size = IMAGE_SIZE if rng.random() < 0.7 else IMAGE_SIZE[::-1]
            image = source.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BICUBIC)
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG", quality=90)
            x1, y1 = rng.uniform(0, size[0] / 2, PROPOSALS_PER_IMAGE), rng.uniform(0, size[1] / 2, PROPOSALS_PER_IMAGE)
            boxes = np.stack([x1, y1, x1 + size[0] / 3, y1 + size[1] / 3], axis=1).round(1).tolist()
            meta = {"width": size[0], "height": size[1], "boxes": boxes}
            writer.write({"__key__": f"photo{index:05d}", "jpg": jpeg.getvalue(), "json": json.dumps(meta).encode()})
    return [path]


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (DataLoader workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _method(name: str, crop: int):
    cls = get_method(name)
    params = cls.scaled_params(cls.Params(), crop / 224)
    torch.manual_seed(0)
    return cls(params, arch="resnet18")  # the model plays no part: only make_views and collate run


def measure_loader(method, shards: list[Path], workers: int, mode: str, batch: int) -> dict[str, float]:
    """One pass over the shards through the engine's data path; the last collated batch kept."""
    samples = ShardStream(shards, seed=0)
    views = ViewStream(samples, method.make_views, seed=0, output=mode)
    views.start_epoch(0, skip_samples=0)
    loader = make_loader(views, workers, seed=0, step_items=batch)
    num_batches = samples.num_samples // batch
    cpu, start = _cpu_seconds(), time.perf_counter()
    last = None
    for last in epoch_batches(loader, method.collate, batch_size=batch, first_batch=0, num_batches=num_batches):
        pass
    seconds = time.perf_counter() - start
    del loader  # workers exit and are reaped here, so their CPU time is counted
    cpu = _cpu_seconds() - cpu
    images = num_batches * batch
    view_count = sum(
        value.shape[0] * (value.shape[1] if value.dim() == 5 else 1)
        for value in last.values()
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() >= 4
    )
    return {
        "images_per_s": images / seconds,
        "views_per_s": view_count / batch * images / seconds,
        "cpu_s_per_image": cpu / images,
        "batch": last,
    }


def finish_ms(batch: dict, repeats: int = 3) -> float:
    """``finish_views`` on the CPU, one thread: ms per collated batch (best of ``repeats``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        finish_views(batch, host=batch)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(threads)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["worker", "device"], choices=["worker", "device"])
    parser.add_argument("--methods", nargs="+", default=["moco_v2", "byol"])
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_photo_shards(Path(tmp), args.images)
        print(f"{args.images} JPEGs ~{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, views at crop {args.crop}, batch {args.batch}")
        print("| method | photometric | workers | images/s | views/s | CPU s / image | finish_views ms / batch (CPU, 1 thread) |")
        print("|---|---|---|---|---|---|---|")
        for name in args.methods:
            method = _method(name, args.crop)
            for mode in args.modes:
                for workers in args.workers:
                    result = measure_loader(method, shards, workers, mode, args.batch)
                    ms = finish_ms(result["batch"])
                    print(
                        f"| {name} | {mode} | {workers} | {result['images_per_s']:.1f} | {result['views_per_s']:.1f} "
                        f"| {result['cpu_s_per_image'] * 1000:.1f} ms | {ms:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
