import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from regioncl.data.shards import ShardStream
from regioncl.engine import OptimizerSettings, PretrainSettings, pretrain
from regioncl.engine.dist import (
    DistEnv,
    expand_slurm_nodelist,
    init_distributed,
    read_dist_env,
    shutdown,
)
from regioncl.engine.loader import ViewStream, epoch_batches, make_loader
from regioncl.engine.optim import LARS, build_optimizer
from regioncl.engine.schedule import LrSchedule, warmup_cosine_lr
from regioncl.methods.moco_v2 import MocoV2Params
from regioncl.models.momentum import cosine_momentum
from regioncl.models.sync_bn import convert_sync_batchnorm

from pretrain_runs import metric_values, newest_model_state, spawn_two_ranks, write_shards  # tests/pretrain_runs.py

RUN = {
    "method": "moco_v2",
    "method_params": {"queue_size": 16, "hidden_dim": 64, "momentum": 0.99, "crop_size": 32},
    "arch": "resnet18",
    "epochs": 2,
    "batch_size": 4,  # 12 images -> 3 steps per epoch, 6 in all
    "warmup_epochs": 1,
    "num_workers": 2,
    "seed": 3,
    "checkpoint_every_steps": 3,
    "log_every": 1,
    "device": "cpu",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory) -> Path:
    """An uninterrupted run; returns its workdir (final checkpoint at ``workdir / 'final.pt'``)."""
    workdir = tmp_path_factory.mktemp("reference")
    pretrain(PretrainSettings.from_dict(RUN), shards, workdir / "final.pt", workdir)
    return workdir


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
    _assert_same_state(newest_model_state(workdir), newest_model_state(reference_run))
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
    _assert_same_state(newest_model_state(workdir), newest_model_state(reference_run))


ACCUMULATE_RUN = {**RUN, "accumulate_steps": 2, "num_workers": 0}  # 2 micro-batches of 2 images per step


def test_resume_mid_epoch_with_gradient_accumulation_ends_bitwise_equal_to_the_uninterrupted_run(shards, tmp_path, capsys):
    # Resuming at step 4 must skip exactly 4 steps x 2 micro-batches: one micro-batch off and the
    # weights differ.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(PretrainSettings.from_dict(ACCUMULATE_RUN), shards, straight / "final.pt", straight)
    pretrain(PretrainSettings.from_dict(ACCUMULATE_RUN), shards, resumed / "final.pt", resumed, stop_after_steps=4)
    pretrain(PretrainSettings.from_dict(ACCUMULATE_RUN), shards, resumed / "final.pt", resumed)
    assert "resuming from step 4 (checkpoint" in capsys.readouterr().out
    _assert_same_state(newest_model_state(resumed), newest_model_state(straight))
    assert metric_values(resumed) == metric_values(straight)


BYOL_RUN = {
    **RUN,
    "method": "byol",
    "method_params": {"hidden_dim": 32, "feature_dim": 16, "crop_size": 32},
    "optimizer": {"name": "lars", "base_lr": 0.2, "weight_decay": 1e-5},
    "epochs": 1,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def byol_run(shards, tmp_path_factory) -> Path:
    """An uninterrupted BYOL run (3 steps); returns its workdir."""
    workdir = tmp_path_factory.mktemp("byol")
    pretrain(PretrainSettings.from_dict(BYOL_RUN), shards, workdir / "final.pt", workdir)
    return workdir


def test_byol_resumed_after_two_steps_ends_bitwise_equal_with_its_cosine_ema(shards, byol_run, tmp_path, capsys):
    pretrain(PretrainSettings.from_dict(BYOL_RUN), shards, tmp_path / "final.pt", tmp_path, stop_after_steps=2)
    pretrain(PretrainSettings.from_dict(BYOL_RUN), shards, tmp_path / "final.pt", tmp_path)
    assert "resuming from step 2" in capsys.readouterr().out
    _assert_same_state(newest_model_state(tmp_path), newest_model_state(byol_run))
    assert torch.load(byol_run / "final.pt", weights_only=True)["method"] == "byol"


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("run_name", "base_lr", "warmup_steps", "total_steps", "momentum"),
    [
        # MoCo v2: SGD 0.03 x 4 / 256, warmup 1 of 2 epochs of 3 steps; constant EMA momentum.
        ("reference_run", 0.03 * 4 / 256, 3, 6, lambda step: 0.99),
        # BYOL: LARS 0.2 x 4 / 256, 1 epoch all warmup; tau rising on the cosine to 1.
        ("byol_run", 0.2 * 4 / 256, 3, 3, lambda step: cosine_momentum(step, base_momentum=0.99, total_steps=3)),
    ],
    ids=["moco_v2", "byol"],
)
def test_logged_lr_and_momentum_of_every_step_are_the_schedules_at_that_step(
    run_name, base_lr, warmup_steps, total_steps, momentum, request
):
    records = _records(request.getfixturevalue(run_name))
    assert [r["step"] for r in records] == list(range(1, total_steps + 1))
    for record in records:
        step = record["step"] - 1  # a record is written after its step: "step" counts the steps done
        lr = warmup_cosine_lr(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps)
        assert (record["lr"], record["momentum"]) == pytest.approx((lr, momentum(step)), rel=1e-12), record


class _ConvOutputDtypes:
    """Records the output dtype of every Conv2d forward in this process while active."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def _record(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            self.dtypes.append(output.dtype)

    def __enter__(self) -> "_ConvOutputDtypes":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def test_bf16_autocast_run_computes_convolutions_in_bf16_and_keeps_fp32_weights(shards, tmp_path):
    run = {**BYOL_RUN, "amp": "bf16", "channels_last": True, "optimizer": {"name": "sgd"}}
    with _ConvOutputDtypes() as convs:  # num_workers 0: every forward runs in this process
        pretrain(PretrainSettings.from_dict(run), shards, tmp_path / "final.pt", tmp_path, stop_after_steps=1)
    # 20 convs x 2 views x (online + target) in one step: autocast was on for all of them.
    assert len(convs.dtypes) == 80 and set(convs.dtypes) == {torch.bfloat16}
    state = torch.load(tmp_path / "checkpoint_00000001.pt", weights_only=False)
    assert state["scaler"] == {}  # bf16 needs no loss scaling
    assert all(math.isfinite(loss) for loss in metric_values(tmp_path))
    assert all(value.dtype != torch.bfloat16 for value in state["model"].values())  # autocast keeps fp32 weights


@pytest.mark.slow  # ~50 s: fp16 convolutions are slow on the CPU
def test_fp16_run_checkpoints_its_grad_scaler_and_resumes_bitwise_with_it(shards, tmp_path, capsys):
    run = {**BYOL_RUN, "amp": "fp16", "optimizer": {"name": "sgd"}}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with _ConvOutputDtypes() as convs:
        pretrain(PretrainSettings.from_dict(run), shards, straight / "final.pt", straight, stop_after_steps=2)
    assert len(convs.dtypes) == 2 * 80 and set(convs.dtypes) == {torch.float16}
    pretrain(PretrainSettings.from_dict(run), shards, resumed / "final.pt", resumed, stop_after_steps=1)
    scaler = torch.load(resumed / "checkpoint_00000001.pt", weights_only=False)["scaler"]
    # This toy run's fp16 gradients overflow at GradScaler's initial scale 2^16 and again at 2^15:
    # each step is skipped and halves the scale, a state only a restored scaler carries on.
    assert (scaler["scale"], scaler["_growth_tracker"]) == (2.0**15, 0)
    pretrain(PretrainSettings.from_dict(run), shards, resumed / "final.pt", resumed, stop_after_steps=2)
    assert "resuming from step 1" in capsys.readouterr().out
    expected, actual = (torch.load(w / "checkpoint_00000002.pt", weights_only=False) for w in (straight, resumed))
    assert expected["scaler"]["scale"] == 2.0**14
    assert actual["scaler"] == expected["scaler"]  # a scaler restarted at the resume would be at 2^15
    _assert_same_state(actual["model"], expected["model"])


def test_settings_from_dict_fills_defaults_and_types_method_params():
    settings = PretrainSettings.from_dict({"method": "moco_v2", "epochs": 1, "method_params": {"crop_scale": [0.3, 1]}})
    assert settings.method_params == MocoV2Params(crop_scale=(0.3, 1.0))
    assert settings.optimizer == OptimizerSettings(name="sgd", base_lr=0.03, reference_batch=256, momentum=0.9, weight_decay=1e-4)
    assert (settings.arch, settings.batch_size, settings.method_params.crop_size) == ("resnet50", 256, 224)
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
        ({"crop_size": 64}, ValueError, r"pretrain.crop_size: view sizes moved .* `methods.moco_v2` .* \['crop_size'\]"),
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


def test_gradual_warmup_and_cosine_floor_match_torchs_schedulers():
    """SoCo's code (spec_soco.md [C]): warm up linearly from lr/100 over W steps, then a cosine to
    1e-6 over the remaining steps. torch's LinearLR then CosineAnnealingLR is that schedule,
    written independently of ours; a wrong warmup end or cosine offset shifts every step."""
    base_lr, warmup_steps, total_steps = 0.8, 4, 13
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    torch_schedule = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=1e-6),
        ],
        milestones=[warmup_steps],
    )
    expected = []
    for _ in range(total_steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        torch_schedule.step()
    ours = LrSchedule(base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps, steps_per_epoch=1,
                      warmup_start_factor=0.01, final_lr=1e-6)
    assert [ours(step) for step in range(total_steps)] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert ours(0) == pytest.approx(0.008) and ours(total_steps - 1) > 1e-6


def test_per_epoch_lr_is_mocos_epoch_formula_held_for_the_epoch():
    """MoCo's code (spec_plrc.md [R; C]): lr * 0.5 * (1 + cos(pi * epoch / epochs)), set at each
    epoch's start."""
    schedule = LrSchedule(base_lr=0.03, warmup_steps=0, total_steps=4 * 5, steps_per_epoch=5, per_epoch=True)
    lrs = [schedule(step) for step in range(20)]
    expected = [0.03 * 0.5 * (1 + math.cos(math.pi * (step // 5) / 4)) for step in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert len(set(lrs[5:10])) == 1 and lrs[5] != lrs[10]


def test_the_engine_logs_the_code_schedule_it_was_given(shards, tmp_path):
    """The settings reach the training loop: a 3-epoch run with the lr set per epoch, a floor and
    MoCo's formula logs each epoch's lr on all of its steps."""
    run = {**RUN, "epochs": 3, "warmup_epochs": 0, "lr_update": "epoch", "final_lr": 1e-5, "checkpoint_every_steps": 9}
    pretrain(PretrainSettings.from_dict(run), shards, tmp_path / "final.pt", tmp_path)
    base_lr, floor = 0.03 * 4 / 256, 1e-5
    expected = [floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * epoch / 3)) for epoch in range(3) for _ in range(3)]
    assert [r["lr"] for r in _records(tmp_path)] == pytest.approx(expected, rel=1e-12)


def test_lars_scales_the_step_by_the_trust_ratio_and_skips_excluded_groups():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([0.0, 2.0]), torch.tensor([0.5])  # ||g|| = 2
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.0)
    optimizer.step()
    # trust = 0.001 * 5 / 2 = 0.0025: w -= 0.1 * 0.0025 * g; the bias gets plain SGD: b -= 0.1 * 0.5
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 4.0 - 0.1 * 0.0025 * 2.0]))
    torch.testing.assert_close(bias.detach(), torch.tensor([0.95]))


def test_lars_adds_weight_decay_before_the_trust_ratio():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    weight.grad = torch.tensor([0.0, 1.5])
    LARS([weight], lr=0.1, momentum=0.9, weight_decay=0.1, eta=0.001).step()
    # g + wd * w = [0.3, 1.9], ||.|| = sqrt(0.09 + 3.61) = sqrt(3.7); trust = 0.001 * 5 / sqrt(3.7)
    trust = 0.001 * 5 / math.sqrt(3.7)
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0 - 0.1 * trust * 0.3, 4.0 - 0.1 * trust * 1.9]))


def test_lars_optimizer_excludes_biases_and_norm_parameters_from_decay_and_adaptation():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    settings = OptimizerSettings(name="lars", base_lr=1.0, reference_batch=256, weight_decay=1e-5)
    adapted, excluded = build_optimizer(model, settings, batch_size=512).param_groups
    assert [p.shape for p in adapted["params"]] == [(4, 3)]
    assert [p.shape for p in excluded["params"]] == [(4,), (4,), (4,)]  # linear bias, BN weight and bias
    assert (adapted["exclude"], adapted["weight_decay"]) == (False, 1e-5)
    assert (excluded["exclude"], excluded["weight_decay"]) == (True, 0.0)
    assert adapted["lr"] == excluded["lr"] == 2.0  # 1.0 * 512 / 256


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


@pytest.fixture(scope="module")
def two_rank_run(shards, tmp_path_factory) -> Path:
    """RUN on 2 gloo ranks (2 images each per step, shuffle-BN on), uninterrupted; returns its workdir."""
    workdir = tmp_path_factory.mktemp("two_ranks")
    spawn_two_ranks(RUN, shards, workdir)
    return workdir


@pytest.mark.slow
def test_two_gloo_processes_train_with_shuffle_bn_and_share_one_queue(two_rank_run):
    final = torch.load(two_rank_run / "final.pt", weights_only=True)
    assert (final["steps"], final["arch"]) == (6, "resnet18")
    state = newest_model_state(two_rank_run)
    assert int(state["queue.pointer"]) == (6 * 4) % 16  # every step enqueued the 4 all-gathered keys
    torch.testing.assert_close(state["queue.features"].norm(dim=1), torch.ones(16))
    # BN statistics are per rank (2 images each), so the weights are not those of a 1-process run;
    # the data each step sees is (test below).
    losses = metric_values(two_rank_run)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.slow  # two more 2-process spawns
def test_two_ranks_resumed_mid_epoch_end_bitwise_equal_to_their_uninterrupted_run(shards, two_rank_run, tmp_path, capfd):
    # Step 4 is epoch 1, batch 1: each rank must skip exactly its own 2 samples of that epoch.
    spawn_two_ranks(RUN, shards, tmp_path, stop=4)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]
    spawn_two_ranks(RUN, shards, tmp_path)
    assert "resuming from step 4 (checkpoint" in capfd.readouterr().out  # the ranks' stdout (rank 0 says it)
    _assert_same_state(newest_model_state(tmp_path), newest_model_state(two_rank_run))
    assert metric_values(tmp_path) == metric_values(two_rank_run)


# Crops of 64 px: at 32 px layer4 is 1x1, BN normalizes over 4 values and amplifies float noise
# chaotically (a 1-process run with 1 vs 2 torch threads already diverges by 0.1 in loss by step 6).
# SGD, not LARS: LARS normalizes the gradient and would hide a wrongly scaled DDP average.
# Shuffle-BN on: with sync BN the key encoder's statistics span the global batch whatever the
# permutation, so the keys equal one process's only if shuffle-BN puts them back in image order.
SYNC_BN_RUNS = {
    "moco_v2": {**RUN, "sync_bn": True, "method_params": {**RUN["method_params"], "crop_size": 64, "shuffle_bn": True}},
}


def _rows_sorted(features: torch.Tensor) -> torch.Tensor:
    # Ranks enqueue their keys in rank order, one process in batch order: same rows, other order.
    return features[torch.argsort(features[:, 0])]


# What docs/pretraining.md states for 1 vs 2 processes, losses and final state alike (measured with
# shuffle-BN on: 2.4e-6 in loss, 1.9e-6 in a BN running variance of about 1.8).
ONE_VS_TWO_PROCESSES_TOLERANCE = 1e-5


def _largest_differences(one: Path, two: Path) -> tuple[float, float]:
    """(largest |loss difference| over the steps, largest |difference| in the final state) of two runs."""
    loss = max(abs(a - b) for a, b in zip(metric_values(one), metric_values(two), strict=True))
    expected, actual = newest_model_state(one), newest_model_state(two)
    assert actual.keys() == expected.keys()
    if "queue.features" in expected:
        expected["queue.features"] = _rows_sorted(expected["queue.features"])
        actual["queue.features"] = _rows_sorted(actual["queue.features"])
    counters = [key for key, value in expected.items() if not value.is_floating_point()]  # queue pointer, BN counts
    assert [key for key in counters if not torch.equal(actual[key], expected[key])] == []
    floats = [key for key in expected if key not in counters]
    state = max((actual[key].double() - expected[key].double()).abs().max().item() for key in floats)
    return loss, state


@pytest.mark.slow  # ~90 s per method on 2 shared cores: two 1-process runs and a 2-process spawn
@pytest.mark.parametrize("method", sorted(SYNC_BN_RUNS))
def test_two_gloo_processes_with_sync_bn_match_one_process_of_the_same_global_batch(method, shards, tmp_path):
    run = SYNC_BN_RUNS[method]
    one, two, other_seed = tmp_path / "one", tmp_path / "two", tmp_path / "other_seed"
    pretrain(PretrainSettings.from_dict(run), shards, one / "final.pt", one)
    spawn_two_ranks(run, shards, two)
    loss, state = _largest_differences(one, two)
    assert loss <= ONE_VS_TWO_PROCESSES_TOLERANCE and state <= ONE_VS_TWO_PROCESSES_TOLERANCE, (loss, state)
    # Negative control: the comparison tells runs apart (another seed: other weights and views).
    pretrain(PretrainSettings.from_dict({**run, "seed": run["seed"] + 1}), shards, other_seed / "final.pt", other_seed)
    loss, state = _largest_differences(other_seed, two)
    assert loss > ONE_VS_TWO_PROCESSES_TOLERANCE and state > ONE_VS_TWO_PROCESSES_TOLERANCE, (loss, state)


def _sync_bn_rank(rank: int, port: int, result_dir: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(read_dist_env(), "cpu")
    try:
        result = _sync_bn_forward_backward(rank, world=2)
        torch.save(result, result_dir / f"rank{rank}.pt")
    finally:
        shutdown()


def _sync_bn_forward_backward(rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's share of a fixed (8, 3, 2, 2) batch through a BN used twice (like BYOL's two views)."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 8, 3, 2, 2) * 3 + 1  # (views, B, C, H, W)
    bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
    with torch.no_grad():
        bn[0].weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    mine = inputs[:, share].clone().requires_grad_(True)
    weights = (torch.arange(8 * 3 * 2 * 2, dtype=torch.float32).view(8, 3, 2, 2) / 10)[share]
    loss = sum((bn(view) * weights).sin().sum() for view in mine)
    loss.backward()
    return {"input_grad": mine.grad, "weight_grad": bn[0].weight.grad, "running_var": bn[0].running_var}


def test_cross_rank_batchnorm_on_two_gloo_ranks_matches_one_batchnorm_over_the_whole_batch(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_sync_bn_rank, args=(port, tmp_path), nprocs=2)
    ranks, one = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)], _sync_bn_forward_backward(0, world=1)
    # Each rank's loss covers its own images; statistics couple them, gradients flow back across ranks.
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in ranks], dim=1), one["input_grad"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], one["weight_grad"])
    torch.testing.assert_close(ranks[0]["running_var"], one["running_var"])


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available")
def test_device_cuda_without_a_gpu_is_refused_before_anything_starts():
    single = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=29500, launcher="single")
    with pytest.raises(ValueError, match=r"device: 'cuda' but torch sees no CUDA GPU"):
        init_distributed(single, "cuda")
    with pytest.raises(ValueError, match=r"device: expected 'auto', 'cpu' or 'cuda', got 'tpu'"):
        init_distributed(single, "tpu")
    assert init_distributed(single, "auto") == torch.device("cpu")
