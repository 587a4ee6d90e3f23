import io
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import webdataset as wds
from PIL import Image

from regioncl.data.shards import ShardStream
from regioncl.engine import OptimizerSettings, PretrainSettings, pretrain
from regioncl.engine.dist import expand_slurm_nodelist, read_dist_env
from regioncl.engine.optim import LARS
from regioncl.engine.schedule import cosine_momentum, warmup_cosine_lr
from regioncl.engine.views import ViewStream, epoch_batches, make_loader
from regioncl.methods.moco_v2 import MocoV2Params

RUN = {
    "method": "moco_v2",
    "method_params": {"queue_size": 16, "hidden_dim": 64, "momentum": 0.99},
    "arch": "resnet18",
    "epochs": 2,
    "batch_size": 4,  # 12 images -> 3 steps per epoch, 6 in all
    "crop_size": 32,
    "warmup_epochs": 1,
    "num_workers": 2,
    "seed": 3,
    "checkpoint_every_steps": 3,
    "log_every": 1,
    "device": "cpu",
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # On a small shared CPU, torch's intra-op threads spin against other processes and make
    # these tiny steps several times slower; one thread is also what each rank gets in CI.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_shards(directory: Path, num_images: int = 12, per_shard: int = 7) -> list[Path]:
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return _write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory) -> Path:
    """An uninterrupted run; returns its workdir (final checkpoint at ``workdir / 'final.pt'``)."""
    workdir = tmp_path_factory.mktemp("reference")
    pretrain(PretrainSettings.from_dict(RUN), shards, workdir / "final.pt", workdir)
    return workdir


def _final_model_state(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(workdir / "checkpoint_00000006.pt", weights_only=False)["model"]


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert different == []


def test_tiny_run_writes_the_contract_checkpoint_loadable_into_torchvision(reference_run):
    final = torch.load(reference_run / "final.pt", weights_only=True)
    assert final["format"] == "regioncl.pretrained/1"
    assert (final["method"], final["arch"], final["steps"], final["epochs"]) == ("moco_v2", "resnet18", 6, 2)
    assert final["transfer"] == {}
    assert PretrainSettings.from_dict(final["config"]) == PretrainSettings.from_dict(RUN)
    result = torchvision.models.resnet18().load_state_dict(final["backbone"], strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    steps = [json.loads(line)["step"] for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in reference_run.glob("checkpoint_*")) == [
        "checkpoint_00000003.pt", "checkpoint_00000003.pt.sha256", "checkpoint_00000006.pt", "checkpoint_00000006.pt.sha256",
    ]


@pytest.fixture(scope="module")
def interrupted_run(shards, tmp_path_factory) -> Path:
    """A run stopped after 4 of its 6 steps (checkpoints at steps 3 and 4); returns its workdir."""
    workdir = tmp_path_factory.mktemp("interrupted")
    pretrain(PretrainSettings.from_dict(RUN), shards, workdir / "final.pt", workdir, stop_after_steps=4)
    assert not (workdir / "final.pt").exists()
    return workdir


def _copy_run(source: Path, destination: Path) -> Path:
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def test_resume_mid_epoch_ends_bitwise_equal_to_the_uninterrupted_run(shards, reference_run, interrupted_run, tmp_path, capsys):
    workdir = _copy_run(interrupted_run, tmp_path)
    pretrain(PretrainSettings.from_dict(RUN), shards, workdir / "final.pt", workdir)  # resumes at epoch 1, batch 1
    assert "resuming from step 4 (checkpoint" in capsys.readouterr().out
    _assert_same_state(_final_model_state(workdir), _final_model_state(reference_run))
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_truncated_newest_checkpoint_is_skipped_and_the_previous_used(shards, reference_run, interrupted_run, tmp_path, capsys):
    workdir = _copy_run(interrupted_run, tmp_path)
    newest = workdir / "checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    pretrain(PretrainSettings.from_dict(RUN), shards, workdir / "final.pt", workdir)  # resumes at epoch 1, batch 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: sha256 does not match" in out
    assert "resuming from step 3 (checkpoint" in out and "checkpoint_00000003.pt" in out
    _assert_same_state(_final_model_state(workdir), _final_model_state(reference_run))


def test_settings_from_dict_fills_defaults_and_types_method_params():
    settings = PretrainSettings.from_dict({"method": "moco_v2", "epochs": 1, "method_params": {"crop_scale": [0.3, 1]}})
    assert settings.method_params == MocoV2Params(crop_scale=(0.3, 1.0))
    assert settings.optimizer == OptimizerSettings(name="sgd", base_lr=0.03, reference_batch=256, momentum=0.9, weight_decay=1e-4)
    assert (settings.arch, settings.batch_size, settings.crop_size) == ("resnet50", 256, 224)
    assert PretrainSettings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"epoch": 1}, ValueError, r"pretrain: unknown key\(s\) \['epoch'\]"),
        ({"method_params": {"queue": 5}}, ValueError, r"pretrain.method_params: unknown key\(s\) \['queue'\]"),
        ({"optimizer": {"name": "adam"}}, ValueError, r"pretrain.optimizer.name: expected one of \['sgd', 'lars'\]"),
        ({"batch_size": "32"}, TypeError, r"pretrain.batch_size: expected int"),
        ({"method": "simclr"}, KeyError, r"'simclr' is not registered"),
        ({"batch_size": 0}, ValueError, r"batch_size: expected >= 1"),
    ],
)
def test_settings_from_dict_rejects_bad_values_naming_the_field(change, error, message):
    with pytest.raises(error, match=message):
        PretrainSettings.from_dict({**RUN, **change})


def test_warmup_then_cosine_lr_matches_hand_values():
    lr = [warmup_cosine_lr(s, base_lr=0.4, warmup_steps=2, total_steps=6) for s in range(6)]
    # warmup: 0.4 * 1/2, 0.4 * 2/2; cosine over 4 steps: 0.4 * (1 + cos(pi * k / 4)) / 2, k = 0..3
    expected = [0.2, 0.4, 0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2, 0.2 * (1 + math.cos(3 * math.pi / 4))]
    assert lr == pytest.approx(expected)
    assert [cosine_momentum(s, base_momentum=0.99, total_steps=4) for s in (0, 2, 4)] == pytest.approx([0.99, 0.995, 1.0])


def test_lars_scales_the_step_by_the_trust_ratio_and_skips_excluded_groups():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([0.0, 2.0]), torch.tensor([0.5])  # ||g|| = 2
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer.step()
    # trust = 0.001 * 5 / 2 = 0.0025: w -= 0.1 * 0.0025 * g; the bias gets plain SGD: b -= 0.1 * 0.5
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 4.0 - 0.1 * 0.0025 * 2.0]))
    torch.testing.assert_close(bias.detach(), torch.tensor([0.95]))


def test_dist_env_from_torchrun_slurm_or_neither():
    torchrun = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == (
        3, 8, 1, "h1", 1234,
    )
    slurm = read_dist_env(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42"}
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert read_dist_env({}).world_size == 1
    assert expand_slurm_nodelist("gpu[01-02,10],cpu3,r[1-2]-n[8-9]") == [
        "gpu01", "gpu02", "gpu10", "cpu3", "r1-n8", "r1-n9", "r2-n8", "r2-n9",
    ]


def _two_process_rank(rank: int, port: int, shards: list[Path], workdir: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    pretrain(PretrainSettings.from_dict({**RUN, "num_workers": 0}), shards, workdir / "final.pt", workdir)


@pytest.mark.slow
def test_two_gloo_processes_train_with_shuffle_bn_and_share_one_queue(shards, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_two_process_rank, args=(port, shards, tmp_path), nprocs=2)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert (final["steps"], final["arch"]) == (6, "resnet18")
    state = _final_model_state(tmp_path)
    assert int(state["queue.pointer"]) == (6 * 4) % 16  # every step enqueued the 4 all-gathered keys
    torch.testing.assert_close(state["queue.features"].norm(dim=1), torch.ones(16))
    # BN statistics are per rank (2 images each), so the weights are not those of a 1-process run;
    # the data each step sees is (test below).
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)


def _key_and_draw(sample: dict, rng: np.random.Generator) -> dict:
    return {"key": sample["key"], "draw": float(rng.random())}


def test_each_step_sees_the_same_samples_and_augmentation_draws_with_one_or_two_ranks(shards):
    def step_batches(rank: int, world: int, workers: int) -> list[set]:
        views = ViewStream(ShardStream(shards, seed=3, rank=rank, world_size=world), _key_and_draw, seed=3)
        loader = make_loader(views, num_workers=workers, seed=3)
        views.start_epoch(1, skip_samples=0)
        batches = epoch_batches(loader, list, batch_size=4 // world, first_batch=0, num_batches=3)
        return [{(item["key"], item["draw"]) for item in batch} for batch in batches]

    one_rank = step_batches(0, 1, workers=0)
    two_ranks = [a | b for a, b in zip(step_batches(0, 2, workers=2), step_batches(1, 2, workers=2))]
    assert one_rank == two_ranks and all(len(batch) == 4 for batch in one_rank)
