"""Tiny pretraining runs shared by the engine's and every method's tests: shards, 2-rank spawns,
readers of what a run leaves in its workdir (metrics.jsonl, resume checkpoints), and a short
finetune from a run's converted weights, and converted weights of a seeded ResNet-18."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
import webdataset as wds
from PIL import Image

from regioncl.convert import convert_checkpoint
from regioncl.engine import PretrainSettings, pretrain
from regioncl.transfer.torchvision_backend import build_detector, finetune
from regioncl.weights import write_pretrained_checkpoint


def write_image_shard(path: Path, images: Sequence[Image.Image], *, first_index: int = 0, boxes: Sequence = ()) -> Path:
    """``images`` as JPEGs in one WebDataset tar, keyed img000, img001, ... from ``first_index``,
    each with the proposal ``boxes`` (x1y1x2y2 in image pixels)."""
    with wds.TarWriter(str(path)) as writer:
        for index, image in enumerate(images, start=first_index):
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG")
            meta = {"width": image.width, "height": image.height, "boxes": [list(box) for box in boxes]}
            writer.write({"__key__": f"img{index:03d}", "jpg": jpeg.getvalue(), "json": json.dumps(meta).encode()})
    return path


def write_shards(directory: Path, num_images: int = 12, per_shard: int = 7) -> list[Path]:
    """Random-noise JPEGs of 40-63 px with one proposal box each, ``per_shard`` per WebDataset tar."""
    rng = np.random.default_rng(0)
    paths = []
    for first in range(0, num_images, per_shard):
        images = []
        for _ in range(first, min(first + per_shard, num_images)):
            width, height = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            images.append(Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)))
        path = directory / f"shard{len(paths)}.tar"
        paths.append(write_image_shard(path, images, first_index=first, boxes=[(1.0, 2.0, 20.0, 30.0)]))
    return paths


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    """Uniform RGB noise of ``width`` x ``height`` px drawn from ``seed``."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def views_batch(method, size: int, seed: int, image: Callable[[int], Image.Image]) -> dict:
    """A batch as the engine builds it: samples ``k{i}`` with images ``image(seed + i)`` through
    the method's ``make_views`` (view rng seeded ``seed + i``), then its ``collate``."""
    samples = [{"key": f"k{i}", "image": image(seed + i)} for i in range(size)]
    return method.collate([method.make_views(s, np.random.default_rng(seed + i)) for i, s in enumerate(samples)])


def metric_values(workdir: Path, key: str = "loss") -> list[float]:
    """``key`` of every step logged in ``workdir/metrics.jsonl``, in step order."""
    return [json.loads(line)[key] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def newest_model_state(workdir: Path) -> dict[str, torch.Tensor]:
    """The method's state dict in the newest resume checkpoint of ``workdir``."""
    newest = sorted(workdir.glob("checkpoint_*.pt"))[-1]
    return torch.load(newest, weights_only=False)["model"]


def _two_process_rank(rank: int, port: int, run: dict, shards: list[Path], workdir: Path, stop: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    settings = PretrainSettings.from_dict({**run, "num_workers": 0})
    pretrain(settings, shards, workdir / "final.pt", workdir, stop_after_steps=stop)


def spawn_two_ranks(run: dict, shards: list[Path], workdir: Path, stop: int | None = None) -> None:
    """``run`` on 2 gloo processes of this machine (torchrun's environment variables), into ``workdir``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_two_process_rank, args=(port, run, shards, workdir, stop), nprocs=2)


def stopped_and_resumed_run_equals_straight_run(
    run: PretrainSettings, shards: list[Path], tmp_path: Path, capsys, *, stop: int = 2
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Run ``run`` straight, and again stopped after ``stop`` steps then resumed; assert the resume
    said so and both end bitwise equal (every state tensor, every logged loss).

    Returns the straight run's workdir and its newest state, for a method's own checks.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(run, shards, straight / "final.pt", straight)
    pretrain(run, shards, resumed / "final.pt", resumed, stop_after_steps=stop)
    pretrain(run, shards, resumed / "final.pt", resumed)
    assert f"resuming from step {stop}" in capsys.readouterr().out
    expected, actual = newest_model_state(straight), newest_model_state(resumed)
    assert actual.keys() == expected.keys()
    assert [key for key in expected if not torch.equal(actual[key], expected[key])] == []
    assert metric_values(resumed) == metric_values(straight)
    return straight, expected


def converted_resnet18_weights(out: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A MoCo v2 pretrained checkpoint of torchvision's ResNet-18 initialised from ``seed`` (its
    ``fc`` left out), written by the contract's writer and converted under ``out``: the
    ``.tv.pth`` path and the backbone tensors it came from."""
    torch.manual_seed(seed)
    backbone = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    checkpoint = out / "checkpoint.pt"
    write_pretrained_checkpoint(
        checkpoint, method="moco_v2", arch="resnet18", steps=1, epochs=1, backbone=backbone, transfer={}, config={}
    )
    convert_checkpoint(checkpoint, out / "w.tv.pth", out / "w.d2.pkl")
    return out / "w.tv.pth", backbone


FINETUNE_SOLVER = {"lr": 0.01, "iterations": 2, "batch_size": 2, "warmup_iters": 1, "lr_steps": [1], "checkpoint_every": 2}


def converted_weights_finetune(
    final_checkpoint: Path,
    tmp_path: Path,
    method: str,
    tensors: Sequence[str] = ("backbone.body.layer1.0.conv1.weight",),
    **benchmark,
) -> dict[str, torch.Tensor]:
    """Convert ``final_checkpoint`` (a run's pretrained checkpoint) and finetune a tiny torchvision
    detector from it for 2 iterations on a drawn 4-image COCO split (``test_finetune.tiny_benchmark``
    with the ``benchmark`` overrides), all under ``tmp_path``. Assert the detector records
    ``method``, and that each of ``tensors`` (detector keys) was loaded from the converted weights
    (present there with the detector's shape; the finetuned tensor nearer the pretrained one than
    the detector's initial one) and then trained (it moved).

    Returns the finetuned detector's state dict, for a method's own checks.
    """
    from test_finetune import draw_split, tiny_benchmark  # tests/test_finetune.py

    convert_checkpoint(final_checkpoint, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    coco = tmp_path / "coco"
    draw_split(coco, "train", [(96, 80), (64, 96), (80, 80), (96, 96)], np.random.default_rng(0))
    draw_split(coco, "val", [(96, 80)], np.random.default_rng(1))
    settings, seed = tiny_benchmark(coco, **{"solver": FINETUNE_SOLVER, **benchmark}), 0
    finetune(settings, tmp_path / "w.tv.pth", seed=seed, out=tmp_path / "model.pt", workdir=tmp_path / "ft")
    detector = torch.load(tmp_path / "model.pt", weights_only=True)
    pretrained = torch.load(tmp_path / "w.tv.pth", weights_only=True)["state_dict"]
    torch.manual_seed(seed)  # as finetune does: the detector as it was built, before loading
    initial = build_detector(settings, num_classes=2).state_dict()  # draw_split's 2 categories
    assert detector["method"] == method
    for name in tensors:
        finetuned = detector["state_dict"][name]
        assert name in pretrained and finetuned.shape == pretrained[name].shape, name
        loaded = (finetuned - pretrained[name]).norm() < (finetuned - initial[name]).norm()
        assert loaded and not torch.equal(finetuned, pretrained[name]), name  # loaded, then trained
    return detector["state_dict"]
