"""Tiny pretraining runs shared by the engine's and every method's tests: shards, 2-rank spawns,
and readers of what a run leaves in its workdir (metrics.jsonl, resume checkpoints)."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from regioncl.engine import PretrainSettings, pretrain


def write_shards(directory: Path, num_images: int = 12, per_shard: int = 7) -> list[Path]:
    """Random-noise JPEGs of 40-63 px with one proposal box each, ``per_shard`` per WebDataset tar."""
    rng = np.random.default_rng(0)
    paths = []
    for first in range(0, num_images, per_shard):
        path = directory / f"shard{len(paths)}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(first, min(first + per_shard, num_images)):
                width, height = int(rng.integers(40, 64)), int(rng.integers(40, 64))
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(pixels).save(jpeg, format="JPEG")
                meta = {"width": width, "height": height, "boxes": [[1.0, 2.0, 20.0, 30.0]]}
                writer.write({"__key__": f"img{index:03d}", "jpg": jpeg.getvalue(), "json": json.dumps(meta).encode()})
        paths.append(path)
    return paths


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
