"""The `supervised` baseline: ImageNet-supervised torchvision weights (a local state dict, or
torchvision's, downloaded) converted into the same files as a pretrained run's, planned per
architecture by the config, and set beside `random` in the tables."""

from __future__ import annotations

import argparse
import functools
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from snakemake.utils import validate
from test_convert import moco_detectron2_name, resnet_backbone, seeded_resnet_state, write_pretrained
from test_settings import ROOT, tiny_config

from regioncl.cli import main as cli
from regioncl.config import ConfigError, WorkflowPlan
from regioncl.convert import ConversionError, SupervisedSource, convert_checkpoint, convert_supervised
from regioncl.tables.layout import PaperTable, TableRow
from regioncl.tables.summary import summarize
from regioncl.weights import (
    WeightsFormatError,
    read_classification_state_dict,
    read_detectron2_weights,
    read_torchvision_weights,
)

BENCHMARK = "embedded_frcnn_r18fpn"  # tiny.yaml's, a resnet18 benchmark


def supervised_config(weights: dict[str, str], baselines: tuple[str, ...] = ("random", "supervised"), **overlay) -> dict:
    return tiny_config(finetune={"baselines": list(baselines), "supervised": {"weights": weights}}, **overlay)


@functools.lru_cache(maxsize=None)
def classifier_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 classification state dict (random init, fixed seed), fc included."""
    return seeded_resnet_state("resnet18")


@pytest.fixture
def r18_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(classifier_state(), path)
    return path


def converted_by_the_rule(plan: WorkflowPlan, run: str, out: Path) -> tuple[Path, Path]:
    """Run the command the convert rule runs for ``run`` (its source words from the plan)."""
    tv, d2 = out / f"{run}.tv.pth", out / f"{run}.d2.pkl"
    cli(["convert", *shlex.split(plan.convert_source_args(run)), "--torchvision", str(tv), "--detectron2", str(d2)])
    return tv, d2


# -- conversion --------------------------------------------------------------------------------


def test_the_converted_backbone_is_the_files_tensors_under_the_names_of_a_pretrained_run(r18_file, tmp_path):
    plan = WorkflowPlan(supervised_config({"resnet18": str(r18_file)}), check_datasets=False)
    tv_path, d2_path = converted_by_the_rule(plan, "supervised_r18", tmp_path)

    source = classifier_state()
    expected = {k: v for k, v in source.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    tv = read_torchvision_weights(tv_path, "resnet18", "the test")
    assert tv["method"] == "supervised"
    assert set(tv["state_dict"]) == {f"backbone.body.{k}" for k in expected}
    for key, tensor in expected.items():
        assert torch.equal(tv["state_dict"][f"backbone.body.{key}"], tensor), key

    d2 = read_detectron2_weights(d2_path)
    assert (d2["method"], d2["arch"], d2["matching_heuristics"]) == ("supervised", "resnet18", True)
    assert set(d2["model"]) == {moco_detectron2_name(k) for k in expected}
    for key, tensor in expected.items():
        assert torch.equal(torch.from_numpy(d2["model"][moco_detectron2_name(key)]), tensor), key

    # Exactly the files a pretrained run with this backbone gives, but for the method.
    pretrained = write_pretrained(tmp_path / "checkpoint_final.pt", "resnet18", resnet_backbone("resnet18"))
    convert_checkpoint(pretrained, tmp_path / "run.tv.pth", tmp_path / "run.d2.pkl")
    run_tv = read_torchvision_weights(tmp_path / "run.tv.pth", "resnet18", "the test")["state_dict"]
    assert run_tv.keys() == tv["state_dict"].keys()
    assert all(torch.equal(run_tv[k], tv["state_dict"][k]) for k in run_tv)
    run_d2 = read_detectron2_weights(tmp_path / "run.d2.pkl")["model"]
    assert run_d2.keys() == d2["model"].keys()


def test_the_classifier_is_reported_dropped(r18_file, tmp_path):
    report = convert_supervised(SupervisedSource.parse(str(r18_file), "resnet18"), tmp_path / "a.tv.pth", tmp_path / "a.d2.pkl")
    assert (report.method, report.arch) == ("supervised", "resnet18")
    assert report.dropped[:2] == ("fc.bias", "fc.weight")


def test_torchvision_weights_are_fetched_hash_checked_and_converted_alike(monkeypatch, tmp_path):
    fetched = []

    def fake_download(url, **kwargs):
        fetched.append((url, kwargs))
        return classifier_state()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    source = SupervisedSource.parse("torchvision", "resnet18")
    convert_supervised(source, tmp_path / "s.tv.pth", tmp_path / "s.d2.pkl")
    url, kwargs = fetched[0]
    assert url == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert kwargs["check_hash"] is True and kwargs["weights_only"] is True
    tv = read_torchvision_weights(tmp_path / "s.tv.pth", "resnet18", "the test")["state_dict"]
    assert torch.equal(tv["backbone.body.conv1.weight"], classifier_state()["conv1.weight"])


def test_a_torchvision_source_names_its_weights_and_reads_back():
    default = SupervisedSource.parse("torchvision", "resnet50")
    assert default.torchvision == "IMAGENET1K_V1" and str(default) == "torchvision:IMAGENET1K_V1"
    assert SupervisedSource.parse(str(default), "resnet50") == default
    assert SupervisedSource.parse("torchvision:DEFAULT", "resnet50").torchvision == "IMAGENET1K_V2"  # the alias resolved
    with pytest.raises(ValueError, match=r"no resnet18 weights 'IMAGENET1K_V2'.*IMAGENET1K_V1"):
        SupervisedSource.parse("torchvision:IMAGENET1K_V2", "resnet18")


def test_a_missing_file_is_an_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "r50.pth"
    with pytest.raises(ValueError, match=str(missing)):
        SupervisedSource.parse(str(missing), "resnet50")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_classification_state_dict(missing)


def test_a_training_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": dict(classifier_state()), "epoch": 90}, path)
    with pytest.raises(WeightsFormatError, match=rf"{path}.*'model', 'epoch'.*state dict alone"):
        read_classification_state_dict(path)
    torch.save({"model": dict(classifier_state()), "args": argparse.Namespace(lr=0.1)}, path)  # not weights_only-safe
    with pytest.raises(WeightsFormatError, match=rf"{path}: not a plain state dict"):
        read_classification_state_dict(path)


def test_weights_of_another_arch_are_refused_listing_the_keys(r18_file, tmp_path):
    with pytest.raises(ConversionError, match=r"backbone vs torchvision resnet50: missing layer1.0.conv3.weight"):
        convert_supervised(SupervisedSource.parse(str(r18_file), "resnet50"), tmp_path / "a.tv.pth", tmp_path / "a.d2.pkl")
    assert not (tmp_path / "a.tv.pth").exists()


# -- the plan ----------------------------------------------------------------------------------


def test_supervised_is_finetuned_per_arch_from_its_converted_weights(r18_file):
    plan = WorkflowPlan(supervised_config({"resnet18": str(r18_file)}), check_datasets=False)
    assert [job.run for job in plan.jobs] == ["random", "supervised_r18", "moco_v2_r18_2ep"]
    assert plan.method_of("supervised_r18") == "supervised"
    assert plan.weights_inputs("supervised_r18", BENCHMARK) == ["results/weights/supervised_r18.tv.pth"]
    assert plan.weights_inputs("random", BENCHMARK) == []
    assert plan.convert_inputs("supervised_r18") == [str(r18_file)]
    assert plan.convert_inputs("moco_v2_r18_2ep") == ["results/pretrain/moco_v2_r18_2ep/checkpoint_final.pt"]
    assert "results/weights/supervised_r18.d2.pkl" in plan.converted_weights()


def test_torchvision_weights_have_no_input_file_and_are_named_to_the_job():
    plan = WorkflowPlan(supervised_config({"resnet18": "torchvision"}), check_datasets=False)
    assert plan.convert_inputs("supervised_r18") == []
    assert plan.convert_source_args("supervised_r18") == "--supervised torchvision:IMAGENET1K_V1 --arch resnet18"


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"resnet18": "/nonexistent/r18.pth"}, r"finetune\.supervised\.weights\.resnet18: '/nonexistent/r18\.pth': no such file"),
        ({"resnet18": "torchvision:IMAGENET1K_V9"}, r"finetune\.supervised\.weights\.resnet18: .*no resnet18 weights 'IMAGENET1K_V9'"),
        ({"resnet50": "torchvision"}, r"finetune\.supervised\.weights: no resnet18 weights .*'embedded_frcnn_r18fpn'"),
    ],
)
def test_a_bad_supervised_source_is_an_error_naming_the_field(weights, expected):
    with pytest.raises(ConfigError, match=expected):
        WorkflowPlan(supervised_config(weights), check_datasets=False)


def test_an_unknown_baseline_is_an_error_listing_the_implemented_ones():
    with pytest.raises(ConfigError, match=r"finetune\.baselines: \['imagenet'\] not implemented.*'supervised'"):
        WorkflowPlan(tiny_config(finetune={"baselines": ["imagenet"]}), check_datasets=False)


def test_a_pretraining_run_may_not_take_a_baselines_name():
    runs = [{"method": "moco_v2", "epochs": 2, "name": "supervised_r18"}]
    with pytest.raises(ConfigError, match=r"pretrain\.runs\[0\]: run name 'supervised_r18' is a baseline's"):
        WorkflowPlan(tiny_config(pretrain={"runs": runs}), check_datasets=False)


def test_the_schema_takes_archs_as_keys_and_names_a_wrong_one():
    schema = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    validate(supervised_config({"resnet18": "torchvision"}), schema)
    with pytest.raises(Exception, match="r18"):
        validate(supervised_config({"r18": "torchvision"}), schema)


# -- tables ------------------------------------------------------------------------------------


def test_tables_put_supervised_with_random_before_the_runs():
    long = pd.DataFrame(
        [
            {"method": m, "run": r, "benchmark": "b", "seed": 0, "column": "box AP", "value": v}
            for m, r, v in [("moco_v2", "moco_v2_r50_200ep", 3.0), ("supervised", "supervised_r50", 2.0), ("random", "random", 1.0)]
        ]
    )
    assert list(summarize(long)["run"]) == ["random", "supervised_r50", "moco_v2_r50_200ep"]
    table = PaperTable(caption="c", columns=(), rows=(), arch="r50")
    assert table.run_of(TableRow(method="supervised", epochs=90)) == "supervised_r50"
    assert table.run_of(TableRow(method="random")) == "random"
