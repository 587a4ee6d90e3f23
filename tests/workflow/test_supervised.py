"""The `supervised` baseline in the DAG: its weights converted by the convert rule, then
finetuned, evaluated and probed like a pretrained run's."""

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY_CONFIG, planned_jobs, snakemake

from regioncl.weights import read_torchvision_weights


def supervised_overlay(directory: Path, source: str) -> Path:
    overlay = directory / "supervised.yaml"
    overlay.write_text(f"finetune:\n  baselines: [random, supervised]\n  supervised:\n    weights: {{resnet18: {source}}}\n")
    return overlay


def resnet18_file(directory: Path) -> Path:
    torch.manual_seed(0)
    path = directory / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_supervised_weights_are_converted_then_finetuned_like_a_run(tmp_path):
    weights = resnet18_file(tmp_path)
    overlay = supervised_overlay(tmp_path, str(weights))
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(TINY_CONFIG), str(overlay))
    jobs = planned_jobs(result.stdout)
    assert jobs["convert"] == 2  # moco_v2's checkpoint and the supervised weights
    assert jobs["finetune"] == jobs["evaluate"] == jobs["probe"] == 3  # random, supervised_r18, moco_v2
    assert f"convert --supervised {weights} --arch resnet18 --torchvision results/weights/supervised_r18.tv.pth" in result.stdout
    assert "--weights results/weights/supervised_r18.tv.pth" in result.stdout
    assert "results/finetune/supervised_r18/embedded_frcnn_r18fpn/seed0/metrics.json" in result.stdout
    assert "--run supervised_r18 --method supervised" in result.stdout
    assert "results/pretrain/supervised" not in result.stdout  # no pretraining job


@pytest.mark.slow
def test_the_convert_job_writes_the_files_tensors(tmp_path):
    weights = resnet18_file(tmp_path)
    overlay = supervised_overlay(tmp_path, str(weights))
    snakemake(tmp_path, "results/weights/supervised_r18.tv.pth", "--cores", "1", "--configfile", str(TINY_CONFIG), str(overlay))
    converted = read_torchvision_weights(tmp_path / "results/weights/supervised_r18.tv.pth", "resnet18", "the test")
    source = torch.load(weights, weights_only=True)
    assert converted["method"] == "supervised"
    kept = [k for k in source if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(converted["state_dict"][f"backbone.body.{k}"], source[k]) for k in kept)
    assert (tmp_path / "results/weights/supervised_r18.d2.pkl").is_file()


def test_a_missing_weights_file_fails_before_any_job_naming_it(tmp_path):
    missing = tmp_path / "nowhere.pth"
    result = snakemake(tmp_path, "-n", "--configfile", str(TINY_CONFIG), str(supervised_overlay(tmp_path, str(missing))), check=False)
    assert result.returncode != 0
    assert "finetune.supervised.weights.resnet18" in result.stdout + result.stderr
    assert str(missing) in result.stdout + result.stderr
