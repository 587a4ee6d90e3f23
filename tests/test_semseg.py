"""Semantic segmentation (``model: fcn``): mIoU as detectron2 counts it, Cityscapes' label
mapping, the dilated FCN, pretrained backbones, the benchmark's settings and identity, and an
embedded finetune + evaluate through the CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from regioncl.cli import main as cli_main
from regioncl.data.embedded import EmbeddedSettings, generate_embedded
from regioncl.data.layouts import DatasetSpec
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.identity import finetune_identity
from regioncl.transfer.registry import load_registry, resolve_benchmark
from regioncl.transfer.semseg import build_fcn, load_pretrained_backbone
from regioncl.transfer.semseg_data import IGNORE_LABEL, CityscapesSemSeg, CocoSemSeg, cityscapes_train_ids, training_crop
from regioncl.transfer.semseg_eval import confusion_matrix, sem_seg_metrics
from pretrain_runs import converted_resnet18_weights  # tests/pretrain_runs.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CITYSCAPES = DatasetSpec(name="cityscapes", layout="cityscapes", root=Path("/no/cityscapes"))


def fcn_benchmark(name: str = "embedded_semseg_r18", root: Path = Path("/no/dataset"), **overrides) -> BenchmarkSettings:
    layout = "cityscapes" if name == "cityscapes_semseg" else "embedded"
    spec = DatasetSpec(name=layout, layout=layout, root=root)
    return BenchmarkSettings.from_dict(resolve_benchmark(name, {"protocol": name, **overrides}, spec))


# -- metrics -----------------------------------------------------------------------------------


def test_miou_by_hand_leaves_out_ignored_pixels_and_classes_absent_from_both():
    prediction = torch.tensor([[0, 0, 1, 2], [1, 1, 2, 2]])
    label = torch.tensor([[0, 0, 1, IGNORE_LABEL], [1, 0, 2, 2]])  # the ignored pixel is predicted 2
    confusion = confusion_matrix(prediction, label, num_classes=4)
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    metrics = sem_seg_metrics(confusion, ("a", "b", "c", "d"))
    # IoU a = 2 / (3 + 2 - 2), b = 2 / (2 + 3 - 2), c = 2 / 2 (not 2 / 3: the ignored pixel is
    # not a false positive); d has no pixels at all and stays out of the mean.
    assert metrics["IoU-a"] == pytest.approx(100 * 2 / 3)
    assert metrics["IoU-c"] == pytest.approx(100.0)
    assert metrics["IoU-d"] is None
    assert metrics["mIoU"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)
    assert metrics["pACC"] == pytest.approx(100 * 6 / 7)
    assert metrics["mACC"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)


def test_a_class_predicted_but_absent_from_ground_truth_stays_out_of_the_mean_as_in_detectron2():
    prediction = torch.tensor([3, 0, 0, 1])
    label = torch.tensor([0, 0, 0, 1])
    metrics = sem_seg_metrics(confusion_matrix(prediction, label, 4), ("a", "b", "c", "d"))
    # d's false positive lowers a's IoU (2 / 3) but d itself has no IoU: mean over a and b only.
    assert metrics["IoU-d"] is None and metrics["IoU-c"] is None
    assert metrics["mIoU"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert metrics["fwIoU"] == pytest.approx(100 * (2 / 3 * 3 / 4 + 1 * 1 / 4))


def test_only_ignored_pixels_leave_every_metric_undefined():
    metrics = sem_seg_metrics(confusion_matrix(torch.zeros(3, dtype=torch.long), torch.full((3,), IGNORE_LABEL), 2), ("a", "b"))
    assert metrics["mIoU"] is None and metrics["pACC"] is None and metrics["IoU-a"] is None


def test_a_label_outside_the_classes_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"labels outside 0..2 and 255: \[0, 7\]"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([7, 0]), 3)


# -- data ----------------------------------------------------------------------------------------


def write_cityscapes_image(root: Path, split: str, city: str, stem: str, label_ids: np.ndarray) -> None:
    images, labels = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (*label_ids.shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / f"{stem}_leftImg8bit.png")
    Image.fromarray(label_ids.astype(np.uint8)).save(labels / f"{stem}_gtFine_labelIds.png")


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
    pytest.importorskip("cityscapesscripts")
    # unlabeled 0, road 7, sidewalk 8, parking 9 (no train id), car 26, bicycle 33, license plate -1 never in a png
    label_ids = np.array([[0, 7, 8], [9, 26, 33]])
    write_cityscapes_image(tmp_path, "train", "aachen", "aachen_000000_000019", label_ids)
    split = CityscapesSemSeg(tmp_path / "leftImg8bit" / "train", tmp_path / "gtFine" / "train")
    assert len(split) == 1 and len(split.class_names) == 19
    assert split.class_names[0] == "road" and split.class_names[13] == "car" and split.class_names[18] == "bicycle"
    assert split.load_label(0).tolist() == [[IGNORE_LABEL, 0, 1], [IGNORE_LABEL, 13, 18]]
    assert split.load_image(0).shape == (3, 2, 3)


def test_cityscapes_image_without_its_label_file_is_named(tmp_path):
    pytest.importorskip("cityscapesscripts")
    write_cityscapes_image(tmp_path, "val", "lindau", "lindau_000000_000019", np.zeros((2, 2)))
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="lindau_000000_000019_gtFine_labelIds.png"):
        CityscapesSemSeg(tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val")


def test_cityscapes_without_cityscapesscripts_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)  # import fails
    with pytest.raises(ModuleNotFoundError, match="pip install cityscapesscripts"):
        cityscapes_train_ids()


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    generate_embedded(root, EmbeddedSettings(seed=0, n_unlabeled=0, n_train=6, n_val=2, image_size=64))
    return root


def test_embedded_instance_masks_become_class_maps_with_background_zero(embedded_root):
    split = CocoSemSeg(embedded_root / "annotations" / "instances_train.json", embedded_root / "train")
    assert split.class_names == ("background", "star", "ring", "triangle", "cross")
    detection = split.detection
    for index in range(len(split)):
        label = split.load_label(index)
        target = detection.load_target(index)
        assert label.shape == split.load_image(index).shape[-2:]
        for mask, category in zip(target["masks"], target["labels"]):  # visible masks never overlap
            assert (label[mask.bool()] == category).all()
        assert (label[target["masks"].sum(0) == 0] == 0).all()


def test_training_crop_pads_with_ignore_and_flips_image_and_label_together():
    image = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 2, 3).expand(3, 2, 3)
    label = torch.tensor([[0, 1, 2], [3, 4, 5]])
    crop, crop_label = training_crop(image, label, scale=1.0, corner=(0.0, 0.0), flip=True, crop_size=4)
    assert crop.shape == (3, 4, 4) and crop_label.shape == (4, 4)
    assert crop_label.tolist() == [[255, 2, 1, 0], [255, 5, 4, 3], [255] * 4, [255] * 4]
    assert crop[0, :2, 1:].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]] and (crop[:, 2:] == 0).all()
    _, doubled = training_crop(image, label, scale=2.0, corner=(0.999, 0.999), flip=False, crop_size=2)
    assert doubled.tolist() == [[4, 4], [4, 4]] or doubled.tolist() == [[5, 5], [5, 5]]


# -- model and weights ---------------------------------------------------------------------------


def test_fcn_has_output_stride_16_with_every_conv5_3x3_conv_at_stride_1_and_dilation_2():
    benchmark = fcn_benchmark("cityscapes_semseg")
    model = build_fcn(benchmark, num_classes=19)
    layer4 = model.backbone["body"].layer4
    assert layer4[0].conv2.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2) for block in layer4)
    model.eval()
    with torch.no_grad():
        features = model.backbone["body"](torch.zeros(1, 3, 64, 96))["c5"]
        logits = model(torch.zeros(1, 3, 64, 96))
    assert features.shape == (1, 2048, 4, 6)  # 64 / 16, 96 / 16
    assert logits.shape == (1, 19, 64, 96)
    head = [m for m in model.head if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.dilation, c.kernel_size) for c in head] == [(256, (6, 6), (3, 3))] * 2
    assert model.classifier.kernel_size == (1, 1) and model.classifier.out_channels == 19
    # torchvision's replace_stride_with_dilation gives the same stage except the first block's
    # 3x3 conv, which it leaves at dilation 1 (MoCo dilates every conv5 3x3 conv).
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).layer4
    ours = {name: (m.stride, m.dilation) for name, m in layer4.named_modules() if isinstance(m, torch.nn.Conv2d)}
    theirs = {name: (m.stride, m.dilation) for name, m in reference.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {name for name in ours if ours[name] != theirs[name]} == {"0.conv2"}


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    return converted_resnet18_weights(tmp_path_factory.mktemp("weights"), seed=7)


def test_pretrained_backbone_is_loaded_and_the_head_left_random(resnet18_weights):
    weights, backbone = resnet18_weights
    benchmark = fcn_benchmark()
    model = build_fcn(benchmark, num_classes=5)
    head_before = model.classifier.weight.clone()
    source = load_pretrained_backbone(model, weights, benchmark)
    state = model.state_dict()
    assert source["method"] == "moco_v2"
    for key, tensor in backbone.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[f"backbone.body.{key}"], tensor), key
    assert torch.equal(model.classifier.weight, head_before)


def test_weights_missing_a_backbone_tensor_are_refused_naming_it(resnet18_weights, tmp_path):
    weights, _ = resnet18_weights
    payload = torch.load(weights, weights_only=True)
    del payload["state_dict"]["backbone.body.layer4.1.conv2.weight"]
    truncated = tmp_path / "truncated.tv.pth"
    torch.save(payload, truncated)
    benchmark = fcn_benchmark()
    with pytest.raises(ValueError, match=r"missing backbone key backbone\.body\.layer4\.1\.conv2\.weight"):
        load_pretrained_backbone(build_fcn(benchmark, 5), truncated, benchmark)


# -- settings ------------------------------------------------------------------------------------


def test_cityscapes_protocol_is_mocos_recipe():
    benchmark = fcn_benchmark("cityscapes_semseg")
    assert (benchmark.task, benchmark.backend, benchmark.arch, benchmark.dataset.format) == ("sem_seg", "torchvision", "resnet50", "cityscapes")
    assert (benchmark.semseg.crop_size, benchmark.semseg.scale_range, benchmark.semseg.head_dilation) == (769, (0.5, 2.0), 6)
    solver = benchmark.solver
    assert (solver.lr, solver.batch_size, solver.weight_decay, solver.iterations) == (0.01, 16, 1e-4, 90000)
    assert solver.lr_steps == (63000, 81000)  # 70% and 90% of the schedule
    assert load_registry()["cityscapes_semseg"].seeds == (0, 1, 2, 3, 4)
    assert benchmark.pretrained_modules == ("backbone",)


def test_fcn_on_detectron2_is_refused_naming_the_benchmark_and_the_reason():
    with pytest.raises(ValueError, match=r"'city'.*'fcn'.*detectron2 has no dilated-FCN head.*expected backend 'torchvision'"):
        resolve_benchmark("city", {"protocol": "cityscapes_semseg", "backend": "detectron2"}, CITYSCAPES)


@pytest.mark.parametrize(
    ("override", "named"),
    [({"fpn": False}, "fpn"), ({"heads": {"fpn_channels": 64}}, "heads"), ({"input": {"min_size": [600]}}, "input.min_size")],
)
def test_detector_settings_on_an_fcn_are_refused_by_name(override, named):
    with pytest.raises(ValueError, match=rf"{named}: .* is a detector's setting"):
        resolve_benchmark("city", {"protocol": "cityscapes_semseg", **override}, CITYSCAPES)


def test_semseg_settings_are_in_the_finetune_identity_and_absent_from_detectors():
    crops = [finetune_identity(fcn_benchmark("cityscapes_semseg", semseg={"crop_size": size}), 0, None)["key"] for size in (769, 513)]
    assert crops[0] != crops[1]
    detector = BenchmarkSettings.from_dict({"name": "d", "dataset": {"root": "/d"}})
    assert "semseg" not in detector.to_dict()
    with pytest.raises(ValueError, match="semseg: only model 'fcn' reads it"):
        BenchmarkSettings.from_dict({"name": "d", "dataset": {"root": "/d"}, "semseg": {"crop_size": 64}})


# -- end to end ----------------------------------------------------------------------------------


def test_embedded_finetune_and_evaluate_through_the_cli_learn_the_shapes(embedded_root, tmp_path):
    """60 iterations on 6 images of 64 px (about 30 s on one thread): the FCN must beat predicting
    background everywhere on its training images by a margin, which a wrong label mapping or a
    head that does not learn cannot (measured: 23.9 against 15.7)."""
    benchmark = fcn_benchmark(
        root=embedded_root, device="cpu",
        semseg={"crop_size": 64, "scale_range": [0.75, 1.25]},
        solver={"lr": 0.1, "iterations": 60, "batch_size": 4, "lr_steps": [54], "checkpoint_every": 30},
    )
    settings = json.dumps(benchmark.to_dict())
    model = tmp_path / "model.pt"
    cli_main(["finetune", "--settings", settings, "--weights", "none", "--seed", "0", "--workdir", str(tmp_path / "work"),
              "--out", str(model), "--metrics", str(tmp_path / "losses.jsonl")])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10])

    # Scored on its own training images: val paths pointed at the train split.
    dataset = benchmark.dataset
    on_train = dataclasses.replace(benchmark, dataset=dataclasses.replace(dataset, val_json=dataset.train_json, val_images=dataset.train_images))
    record_path = tmp_path / "metrics.json"
    cli_main(["evaluate", "--settings", json.dumps(on_train.to_dict()), "--model", str(model), "--run", "random",
              "--method", "random", "--out", str(record_path)])
    record = json.loads(record_path.read_text())
    assert record["benchmark"] == "embedded_semseg_r18" and record["run"] == "random"

    split = CocoSemSeg(dataset.path("train_json"), dataset.path("train_images"))
    background = torch.zeros(5, 5, dtype=torch.int64)
    for index in range(len(split)):
        label = split.load_label(index)
        background += confusion_matrix(torch.zeros_like(label), label, 5)
    all_background = sem_seg_metrics(background, split.class_names)["mIoU"]
    assert record["metrics"]["sem_seg"]["mIoU"] > all_background + 4, (record["metrics"]["sem_seg"], all_background)
