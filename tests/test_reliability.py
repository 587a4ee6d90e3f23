"""Pretraining never ends in a silently wrong or unsafe state: a diverged run stops before it
writes, a planted checkpoint runs no code, a torn metrics line does not block resume, and a
second process cannot share a workdir."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from pretrain_runs import write_shards
from test_engine import RUN

from regioncl.engine import PretrainSettings, pretrain, run_identity
from regioncl.engine.checkpoint import (
    WorkdirBusyError,
    capture_rng_state,
    load_latest_checkpoint,
    lock_workdir,
    restore_rng_state,
    save_resume_checkpoint,
)
from regioncl.weights import write_pretrained_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return write_shards(tmp_path_factory.mktemp("shards"))


def zero_temperature_settings() -> PretrainSettings:
    """What `methods: {moco_v2: {temperature: 0.0}}` asked for before the parse refused it."""
    settings = PretrainSettings.from_dict(RUN)
    return dataclasses.replace(settings, method_params=dataclasses.replace(settings.method_params, temperature=0.0))


def test_nan_loss_stops_pretraining_naming_the_step_and_loss_before_any_checkpoint(shards, tmp_path):
    with pytest.raises(FloatingPointError, match=r"pretrain step 1: non-finite loss \['loss'\]"):
        pretrain(zero_temperature_settings(), shards, tmp_path / "final.pt", tmp_path / "work")
    assert not (tmp_path / "final.pt").exists()
    assert list((tmp_path / "work").glob("checkpoint_*")) == []


def test_no_checkpoint_with_a_non_finite_tensor_is_written(tmp_path):
    state = {"model": {"conv.weight": torch.tensor([1.0, float("nan")]), "bn.num_batches_tracked": torch.tensor(3)}}
    with pytest.raises(FloatingPointError, match=r"checkpoint at step 7: non-finite values in 1 tensor\(s\) \(model\.conv\.weight\)"):
        save_resume_checkpoint(tmp_path, 7, state, keep=2)
    with pytest.raises(FloatingPointError, match=r"pretrained weights after step 7: .*backbone\.w"):
        write_pretrained_checkpoint(
            tmp_path / "final.pt", method="moco_v2", arch="resnet18", steps=7, epochs=1,
            backbone={"w": torch.tensor([float("inf")])}, transfer={}, config={},
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


class Payload:
    """Unpickling this runs ``Path(target).touch()``: what a planted checkpoint could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_planted_checkpoint_runs_no_code_and_is_not_loaded(tmp_path):
    genuine = {"step": 3, "model": {"w": torch.ones(2)}, "rng": capture_rng_state()}
    save_resume_checkpoint(tmp_path, 3, genuine, keep=2)
    touched = tmp_path / "PWNED"
    planted = tmp_path / "checkpoint_99999999.pt"
    torch.save({"format": "regioncl.resume/2", "step": 99999999, "payload": Payload(touched)}, planted)
    # With a checksum anyone can recompute beside it.
    planted.with_name(planted.name + ".sha256").write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
    reports = []
    state, path = load_latest_checkpoint(tmp_path, reports.append)
    assert not touched.exists()
    assert path.name == "checkpoint_00000003.pt" and state["step"] == 3
    assert len(reports) == 1 and "checkpoint_99999999.pt: refused" in reports[0]


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    save_resume_checkpoint(tmp_path, 1, {"rng": capture_rng_state()}, keep=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state, _ = load_latest_checkpoint(tmp_path, print)
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_resume_goes_on(shards, tmp_path, capsys):
    settings = PretrainSettings.from_dict(RUN)
    pretrain(settings, shards, tmp_path / "final.pt", tmp_path, stop_after_steps=3)
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "epoch": 1, "lo')  # the disk filled up mid-append
    pretrain(settings, shards, tmp_path / "final.pt", tmp_path)
    assert "dropping a torn last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and (tmp_path / "final.pt").is_file()


def test_a_second_pretrain_on_a_busy_workdir_fails_naming_it(shards, tmp_path):
    with lock_workdir(tmp_path):  # the first run, still training
        with pytest.raises(WorkdirBusyError, match=rf"{tmp_path}: another process \(pid \d+\) is training"):
            pretrain(PretrainSettings.from_dict(RUN), shards, tmp_path / "final.pt", tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    with lock_workdir(tmp_path):  # released with the first run
        pass


def test_pretrain_identity_changes_with_settings_and_shards_not_with_logging(shards, tmp_path):
    settings = PretrainSettings.from_dict(RUN)
    identity = run_identity(settings, shards)
    assert run_identity(dataclasses.replace(settings, log_every=5), shards) == identity
    assert run_identity(dataclasses.replace(settings, seed=4), shards) != identity
    rebuilt = tmp_path / shards[0].name
    rebuilt.write_bytes(shards[0].read_bytes() + b"\0" * 512)  # another size: other samples
    assert run_identity(settings, [rebuilt, *shards[1:]]) != identity


def test_schedule_options_added_later_leave_earlier_runs_identity_alone(shards):
    """Runs started before ``warmup_start_factor``/``final_lr``/``lr_update`` existed hashed
    settings without them; at their defaults the identity must not move (or an upgrade would
    restart every interrupted run), and set, each must move it (another training)."""
    settings = PretrainSettings.from_dict(RUN)
    before_the_options = {
        key: value for key, value in settings.to_dict().items()
        if key not in {"checkpoint_every_steps", "keep_checkpoints", "log_every", "device",
                       "warmup_start_factor", "final_lr", "lr_update"}
    }
    data = sorted((shard.name, shard.stat().st_size) for shard in shards)
    blob = json.dumps([before_the_options, data], sort_keys=True).encode()
    assert run_identity(settings, shards) == hashlib.sha256(blob).hexdigest()[:12]
    for change in ({"warmup_start_factor": 0.01}, {"final_lr": 1e-6}, {"lr_update": "epoch"}):
        assert run_identity(dataclasses.replace(settings, **change), shards) != run_identity(settings, shards), change
