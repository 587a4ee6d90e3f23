"""The detectron2 backend with detectron2 itself: converted weights load into its R50-C4 and
R50-FPN detectors, 2-iteration finetunes + evaluations of the C4, FPN and RetinaNet families run
on the CPU on the embedded labeled set, and a killed finetune resumes from its last checkpoint
(skipped without detectron2). VOC, LVIS and Cityscapes: tests/test_detectron2_datasets.py."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import numpy
import pytest
import skimage.data
import skimage.transform
import torch
import torchvision

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from regioncl.convert import convert_checkpoint
from regioncl.data.embedded import EmbeddedSettings, generate_embedded
from regioncl.data.layouts import DatasetSpec
from regioncl.methods import get_method
from regioncl.transfer import detectron2_backend
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.detectron2_config import dataset_names, detectron2_options
from regioncl.transfer.identity import finetune_identity
from regioncl.transfer.loading import DETECTRON2_BACKBONE_KEY, detectron2_load_check, shapes_of
from regioncl.transfer.registry import resolve_benchmark
from regioncl.weights import read_detectron2_weights, write_detectron2_weights, write_pretrained_checkpoint

FIXTURE_COCO = Path(__file__).parent / "fixtures" / "datasets" / "coco"
# Smallest settings that still run every part of a detector on the CPU: few RoIs (the C4 head
# runs res5 on every sampled RoI, 512 per image by default), 128 px input, 2 iterations (the
# first one warm-up), and a score threshold under the untrained heads' scores (RetinaNet's
# prior is 0.01, an R-CNN's is about 1 / (classes + 1)) so that evaluation scores detections.
CPU_HEADS = {"fpn_channels": 32, "box_head_dim": 64, "mask_head_channels": 16, "roi_batch_size_per_image": 32,
             "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
             "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}
CPU_INPUT = {"min_size": [128], "max_size": 160, "min_size_test": 128, "max_size_test": 160}
CPU_SOLVER = {"batch_size": 2, "iterations": 2, "warmup_iters": 1, "lr": 0.001, "lr_steps": [1], "checkpoint_every": 1000}
CPU_EVAL = {"score_threshold": 0.001, "detections_per_image": 20}
CPU_SETTINGS = {"heads": CPU_HEADS, "input": CPU_INPUT, "solver": CPU_SOLVER, "eval": CPU_EVAL}


def photos() -> torch.Tensor:
    """(3, 3, 128, 128) photos from the scikit-image wheel, ImageNet-normalised RGB."""
    images = [skimage.transform.resize(load(), (128, 128)) for load in (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea)]
    batch = torch.tensor(numpy.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (batch - mean[:, None, None]) / std[:, None, None]


def write_pretrained(path: Path, transfer: dict | None = None) -> Path:
    """A pretrained checkpoint of a randomly initialised ResNet-50 whose BN statistics are those
    of its activations on photos, as a trained network's are: with the init's mean 0 / variance
    1 an eval-mode detector's features grow block after block and one SGD step saturates its
    classifier (every RoI background, nothing to score)."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of this one batch
    with torch.no_grad():
        resnet(photos())
    backbone = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    torch.save(
        {"format": "regioncl.pretrained/1", "method": "soco", "arch": "resnet50", "steps": 1, "epochs": 1,
         "backbone": backbone, "transfer": transfer or {}, "config": {}},
        path,
    )
    return path


def converted_weights(directory: Path) -> Path:
    """A pretrained checkpoint converted by ``regioncl.convert``: its detectron2 ``.pkl``."""
    convert_checkpoint(write_pretrained(directory / "ckpt.pt"), directory / "w.tv.pth", directory / "w.d2.pkl")
    return directory / "w.d2.pkl"


def benchmark(name: str, **overrides) -> BenchmarkSettings:
    """A tiny CPU benchmark on the COCO fixture (2 images, 1 class), 2 iterations at 128 px."""
    data = {
        "name": name,
        "backend": "detectron2",
        "dataset": {"root": str(FIXTURE_COCO), "train_json": "annotations/instances_train2017.json",
                    "train_images": "train2017", "val_json": "annotations/instances_val2017.json",
                    "val_images": "val2017"},
        "arch": "resnet50",
        "norm": "bn",
        **CPU_SETTINGS,
        **overrides,
    }
    return BenchmarkSettings.from_dict(data)


def assert_scored(record: dict, expected: dict[str, set[str]]) -> None:
    """The record holds the evaluator's metrics of each task, those finite, the rest finite or
    None (undefined for lack of ground truth in that group)."""
    assert set(record["metrics"]) == set(expected)
    for task, names in expected.items():
        values = record["metrics"][task]
        assert names <= set(values), (task, sorted(values))
        assert all(math.isfinite(values[name]) for name in names), (task, values)
        assert all(value is None or math.isfinite(value) for value in values.values()), (task, values)


def loaded_stem(model_state: dict[str, torch.Tensor], pkl: Path) -> dict[str, bool]:
    """For each stem tensor of the converted ``.pkl``: does the detector hold it unchanged?"""
    with open(pkl, "rb") as handle:
        converted = pickle.load(handle)["model"]
    stem = {k: v for k, v in converted.items() if k.startswith("stem.")}
    found = {k: next(v for name, v in model_state.items() if name.endswith(f".{k}")) for k in stem}
    return {k: torch.equal(found[k], torch.from_numpy(v)) for k, v in stem.items()}


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory) -> Path:
    """The embedded labeled set, tiny: 4 train and 2 val images of at most 128 px, 4 classes."""
    root = tmp_path_factory.mktemp("embedded")
    generate_embedded(root, EmbeddedSettings(seed=0, n_unlabeled=0, n_train=4, n_val=2, image_size=128))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return converted_weights(tmp_path_factory.mktemp("weights"))


def embedded_benchmark(name: str, root: Path, **overrides) -> BenchmarkSettings:
    """A CPU benchmark on the embedded dataset, resolved as the workflow resolves a config entry
    (split paths from the ``embedded`` layout). The stem is frozen (``trainable_layers: 4``,
    ``frozen_bn``) so that a finetuned detector still holds the converted stem bit for bit."""
    entry = {"backend": "detectron2", "arch": "resnet50", "norm": "frozen_bn", "trainable_layers": 4,
             **CPU_SETTINGS, **overrides}
    spec = DatasetSpec(name="embedded", layout="embedded", root=root)
    return BenchmarkSettings.from_dict(resolve_benchmark(name, entry, spec))


def resnet_keys(model: torch.nn.Module) -> set[str]:
    """The detector's pretrained ResNet tensors: the stem and res2..res5 wherever they live
    (``backbone.bottom_up.`` under an FPN, ``backbone.`` and ``roi_heads.res5.`` in C4), without
    the norm MoCo's C4 head adds after res5 (not pretrained)."""
    resnet = re.compile(r"(backbone\.(bottom_up\.)?(stem|res[2-5])|roi_heads\.res5\.\d+)\..+")
    return {k for k in model.state_dict() if resnet.fullmatch(k) and not k.endswith("num_batches_tracked")}


def incompatible_keys(model: torch.nn.Module, pkl: Path):
    checkpointer = DetectionCheckpointer(model)
    return checkpointer._load_model(checkpointer._load_file(str(pkl)))


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("c4", {"fpn": False, "model": "faster_rcnn"}), ("fpn", {"model": "mask_rcnn"}), ("retina", {"model": "retinanet"})],
)
def test_converted_pkl_fills_every_backbone_weight(weights, name, overrides):
    cfg = detectron2_backend.build_cfg(benchmark(name, **overrides), num_classes=1)
    model = build_model(cfg)
    keys = incompatible_keys(model, weights)
    resnet = resnet_keys(model)
    assert len(resnet) == 265  # R50: 53 convs + 53 norms x 4 tensors; C4 holds res5 in its head
    assert sorted(set(keys.missing_keys) & resnet) == []
    assert keys.incorrect_shapes == [] and keys.unexpected_keys == []


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("c4", {"fpn": False, "model": "mask_rcnn", "res5_extra_norm": True}), ("fpn", {"model": "mask_rcnn"}),
     ("retina", {"model": "retinanet"})],
)
def test_the_load_check_requires_the_resnet_detectron2_fills(weights, name, overrides):
    """``loading.detectron2_load_check`` sees the real detectors as detectron2 loads them: the
    ResNet it requires is the one the converted weights fill, the heads missing on purpose."""
    model = build_model(detectron2_backend.build_cfg(benchmark(name, **overrides), num_classes=1))
    problems, left_out = detectron2_load_check(shapes_of(model.state_dict()), shapes_of(read_detectron2_weights(weights)["model"]))
    assert (problems, left_out) == ([], [])
    required = {k for k in model.state_dict() if DETECTRON2_BACKBONE_KEY.fullmatch(k) and not k.endswith("num_batches_tracked")}
    assert required == resnet_keys(model)


def test_finetune_refuses_weights_without_a_backbone_tensor_naming_it(tmp_path, weights):
    converted = read_detectron2_weights(weights)
    del converted["model"]["res4.0.conv1.weight"]
    write_detectron2_weights(tmp_path / "w.d2.pkl", converted)
    bench = benchmark("fpn", model="faster_rcnn")
    with pytest.raises(ValueError, match=r"w\.d2\.pkl: cannot load into the detector:\n  missing backbone key backbone\.bottom_up\.res4\.0\.conv1\.weight"):
        detectron2_backend.finetune(bench, tmp_path / "w.d2.pkl", 0, tmp_path / "m.pt", tmp_path / "work", num_workers=0)
    assert not (tmp_path / "m.pt").exists()


def soco_weights(directory: Path, cfg) -> tuple[Path, dict, dict]:
    """SoCo-like converted weights for the detector of ``cfg``: (the ``.pkl``, its FPN and its
    box head as the detector names them, without prefix, random values)."""
    state = build_model(cfg).state_dict()
    fpn = {
        k.removeprefix("backbone."): v.clone().normal_() if v.is_floating_point() else v
        for k, v in state.items() if k.startswith("backbone.fpn_")
    }
    head = {
        k.removeprefix("roi_heads.box_head."): v.clone().normal_() if v.is_floating_point() else v
        for k, v in state.items() if k.startswith("roi_heads.box_head.")
    }
    # the pretrained checkpoint stores them as torchvision's FPN / detectron2's head name them
    tv_fpn = {}
    for key, value in fpn.items():
        kind, rest = key.split(".", 1)
        block = "inner_blocks" if kind.startswith("fpn_lateral") else "layer_blocks"
        level = int(kind[-1]) - 2
        tv_fpn[f"{block}.{level}." + ("1." + rest.removeprefix("norm.") if rest.startswith("norm.") else "0." + rest)] = value
    ckpt = write_pretrained(directory / "ckpt.pt", {"fpn": tv_fpn, "box_head": head})
    convert_checkpoint(ckpt, directory / "w.tv.pth", directory / "w.d2.pkl")
    return directory / "w.d2.pkl", fpn, head


def test_soco_fpn_and_box_head_fill_the_detector(tmp_path):
    bench = benchmark("soco", fpn_norm="bn", box_head="4conv1fc", head_norm="bn")
    cfg = detectron2_backend.build_cfg(bench, num_classes=1)
    pkl, fpn, head = soco_weights(tmp_path, cfg)
    detector = build_model(cfg)
    keys = incompatible_keys(detector, pkl)
    assert not [k for k in keys.missing_keys if k.startswith(("backbone.", "roi_heads.box_head."))]
    assert keys.unexpected_keys == [] and keys.incorrect_shapes == []
    loaded = detector.state_dict()
    # 8 FPN convs and 4 head convs, each a weight (no bias before a norm) and 5 BN tensors; fc1
    assert len(fpn) == 8 * 6 and len(head) == 4 * 6 + 2
    assert all(torch.equal(loaded[f"backbone.{k}"], v) for k, v in fpn.items())
    assert all(torch.equal(loaded[f"roi_heads.box_head.{k}"], v) for k, v in head.items())


def test_a_2fc_detector_keeps_its_own_head_with_soco_weights(tmp_path):
    """A 2fc head's fc1 has the 4conv1fc head's fc1 shape (FC_DIM x C*7*7), so detectron2's
    suffix matching alone would load it; the backend hands it only the detector's modules."""
    soco = detectron2_backend.build_cfg(benchmark("soco", fpn_norm="bn", box_head="4conv1fc", head_norm="bn"), num_classes=1)
    pkl, fpn, head = soco_weights(tmp_path, soco)
    bench = benchmark("two_fc", fpn_norm="bn")
    cfg = detectron2_backend.build_cfg(bench, num_classes=1)
    assert build_model(cfg).state_dict()["roi_heads.box_head.fc1.weight"].shape == head["fc1.weight"].shape
    unfiltered = build_model(cfg)
    incompatible_keys(unfiltered, pkl)
    assert torch.equal(unfiltered.state_dict()["roi_heads.box_head.fc1.weight"], head["fc1.weight"])  # the hazard

    kept, left_out = detectron2_backend.pretrained_for(bench, pkl, read_detectron2_weights(pkl)["model"])
    assert left_out == sorted(f"box_head.{k}" for k in head if not k.endswith("num_batches_tracked"))
    write_detectron2_weights(tmp_path / "kept.d2.pkl", {**read_detectron2_weights(pkl), "model": kept})
    detector = build_model(cfg)
    initial = {k: v.clone() for k, v in detector.state_dict().items() if k.startswith("roi_heads.box_head.")}
    keys = incompatible_keys(detector, tmp_path / "kept.d2.pkl")
    assert keys.unexpected_keys == [] and keys.incorrect_shapes == []
    assert not [k for k in keys.missing_keys if k.startswith("backbone.")]
    loaded = detector.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in initial.items())  # the 2fc head as initialised
    assert all(torch.equal(loaded[f"backbone.{k}"], v) for k, v in fpn.items())


def resim_fpn_weights(directory: Path, fpn_norm: str) -> tuple[Path, dict[str, numpy.ndarray]]:
    """A ``resim_fpn`` R50 checkpoint (FPN laterals on C3-C5, outputs on P3-P4, 32 wide; every
    FPN tensor random, so that a loaded one cannot equal the detector's init by chance),
    converted by ``regioncl.convert``: (the ``.pkl``, its tensors)."""
    cls = get_method("resim_fpn")
    torch.manual_seed(0)
    method = cls(cls.Params(fpn_channels=CPU_HEADS["fpn_channels"], fpn_norm=fpn_norm, hidden_dim=32, queue_size=16), arch="resnet50")
    backbone, transfer = method.transfer_state()
    transfer = {"fpn": {k: v.clone().normal_() if v.is_floating_point() else v for k, v in transfer["fpn"].items()}}
    write_pretrained_checkpoint(directory / "ckpt.pt", method="resim_fpn", arch="resnet50", steps=1, epochs=1,
                                backbone=backbone, transfer=transfer, config={})
    convert_checkpoint(directory / "ckpt.pt", directory / "w.tv.pth", directory / "w.d2.pkl")
    return directory / "w.d2.pkl", read_detectron2_weights(directory / "w.d2.pkl")["model"]


@pytest.mark.parametrize(
    ("model", "fpn_norm", "fpn_missing"),
    [
        ("mask_rcnn", "bn", {"fpn_lateral2", "fpn_output2", "fpn_output5"}),
        ("mask_rcnn", "none", {"fpn_lateral2", "fpn_output2", "fpn_output5"}),
        ("retinanet", "bn", {"fpn_output5", "top_block"}),  # its FPN starts at C3 too; P6-P7 convs on top
    ],
)
def test_resim_fpn_from_c3_fills_the_detector_levels_it_has(tmp_path, model, fpn_norm, fpn_missing):
    """ReSim-FPN^T's FPN (C3 on, outputs P3-P4) lands in detectron2's FPN blocks of those levels:
    the backend's check (``pretrained_for``) keeps every tensor and reports nothing, and
    detectron2 loads them all, its other FPN blocks (P2, P5 outputs; RetinaNet's P6-P7 convs) the
    only backbone keys missing."""
    pkl, converted = resim_fpn_weights(tmp_path, fpn_norm)
    blocks = {k.split(".")[0] for k in converted if k.startswith("fpn_")}
    assert blocks == {"fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output3", "fpn_output4"}
    bench = benchmark("resim", model=model, fpn_norm=fpn_norm)
    assert bench.pretrained_modules == ("backbone", "fpn")
    kept, left_out = detectron2_backend.pretrained_for(bench, pkl, converted)
    assert left_out == [] and kept.keys() == converted.keys()

    detector = build_model(detectron2_backend.build_cfg(bench, num_classes=1))
    keys = incompatible_keys(detector, pkl)
    assert keys.unexpected_keys == [] and keys.incorrect_shapes == []
    assert {k.split(".")[1] for k in keys.missing_keys if k.startswith("backbone.")} == fpn_missing
    loaded = detector.state_dict()
    place = {k: f"backbone.{k}" if k.startswith("fpn_") else f"backbone.bottom_up.{k}" for k in converted}
    assert [k for k, v in converted.items() if not torch.equal(loaded[place[k]], torch.from_numpy(v))] == []
    per_conv = 5 if fpn_norm == "bn" else 2  # weight + BN's 4 tensors (its counter dropped), or weight + bias
    assert len([k for k in converted if k.startswith("fpn_")]) == 5 * per_conv
    assert len(resnet_keys(detector)) == 265 == len(converted) - 5 * per_conv


@pytest.mark.parametrize(
    ("name", "overrides", "tasks"),
    [
        ("c4", {"fpn": False, "model": "mask_rcnn", "res5_extra_norm": True}, {"bbox", "segm"}),
        ("fpn", {"model": "mask_rcnn"}, {"bbox", "segm"}),
        ("retina", {"model": "retinanet"}, {"bbox"}),
    ],
)
def test_two_iteration_finetune_and_evaluation_on_the_embedded_set(tmp_path, embedded_root, weights, name, overrides, tasks):
    bench = embedded_benchmark(name, embedded_root, **overrides)
    model_path = tmp_path / "model.pt"
    detectron2_backend.finetune(bench, weights, 0, model_path, tmp_path / "work", num_workers=0)
    record = detectron2_backend.evaluate(bench, model_path, tmp_path / "metrics.json", run="r", num_workers=0)

    assert json.loads((tmp_path / "metrics.json").read_text()) == record
    assert (record["benchmark"], record["seed"], record["weights"], record["method"]) == (name, 0, str(weights), "soco")
    assert {"torch", "detectron2", "pycocotools", "regioncl"} <= set(record["versions"])
    assert_scored(record, {task: {"AP", "AP50", "AP75"} for task in tasks})
    # the frozen stem still holds the converted tensors: the detector trained from them
    stem = loaded_stem(torch.load(model_path, weights_only=True)["model"], weights)
    assert len(stem) == 5 and all(stem.values()), stem


def test_mask_format_follows_the_training_masks(embedded_root):
    """The embedded set's masks are RLE, which detectron2's polygon format cannot carry; the
    COCO fixture's are polygons (the papers' configs)."""
    assert detectron2_backend.mask_format_of(embedded_benchmark("fpn", embedded_root, model="mask_rcnn")) == "bitmask"
    assert detectron2_backend.mask_format_of(embedded_benchmark("fpn", embedded_root, model="faster_rcnn")) == "polygon"
    assert detectron2_backend.mask_format_of(benchmark("coco", model="mask_rcnn")) == "polygon"


class Killed(RuntimeError):
    """Stands for the job being killed mid-run."""


def test_killed_finetune_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, embedded_root, weights):
    bench = embedded_benchmark("fpn", embedded_root, model="faster_rcnn",
                               solver={**CPU_SOLVER, "iterations": 3, "checkpoint_every": 1})
    model_path = tmp_path / "model.pt"
    # the backend's checkpoints live in the run's identity directory under the workdir
    work = tmp_path / "work" / finetune_identity(bench, 0, weights, detectron2_backend.RESUME_MAY_CHANGE)["key"]
    log = work / "log.txt"
    finetune = detectron2_backend.finetune
    run_step = detectron2_backend.BenchmarkTrainer.run_step

    def run_step_until_killed(trainer):
        if trainer.iter == 2:
            raise Killed("killed at iteration 2")
        run_step(trainer)

    monkeypatch.setattr(detectron2_backend.BenchmarkTrainer, "run_step", run_step_until_killed)
    with pytest.raises(Killed):
        finetune(bench, weights, 0, model_path, tmp_path / "work", num_workers=0)
    assert not model_path.exists()
    assert (work / "last_checkpoint").read_text() == "model_0000001.pth"
    monkeypatch.undo()

    finetune(bench, weights, 0, model_path, tmp_path / "work", num_workers=0)
    assert "Starting training from iteration 2" in log.read_text()
    final = torch.load(work / "model_final.pth", weights_only=False)
    assert final["iteration"] == 2  # 0-based: the third and last iteration ran in the second run

    # a finished run resumes to nothing more and leaves the same weights
    before = torch.load(model_path, weights_only=True)["model"]
    finetune(bench, weights, 0, model_path, tmp_path / "work", num_workers=0)
    assert log.read_text().count("Starting training from iteration 3") == 1
    after = torch.load(model_path, weights_only=True)["model"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_options_merge_into_detectron2_defaults():
    bench = benchmark("c4", fpn=False, model="faster_rcnn", res5_extra_norm=True)
    cfg = detectron2_backend.build_cfg(bench, num_classes=1)
    options = detectron2_options(bench, 1)
    assert cfg.MODEL.ROI_HEADS.NAME == options["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
    model = build_model(cfg)
    assert any(name.startswith("roi_heads.res5.norm") for name, _ in model.named_parameters())


def test_workdir_of_another_run_is_refused(tmp_path):
    bench = benchmark("fpn", model="faster_rcnn")
    run_dir = tmp_path / "work" / finetune_identity(bench, 0, None, detectron2_backend.RESUME_MAY_CHANGE)["key"]
    run_dir.mkdir(parents=True)
    (run_dir / "identity.json").write_text(json.dumps({"benchmark": "other", "seed": 0, "key": "0123456789ab"}))
    with pytest.raises(ValueError, match=r"holds checkpoints of .*'other'"):
        detectron2_backend.finetune(bench, None, 0, tmp_path / "m.pt", tmp_path / "work", num_workers=0)


def test_pkl_records_method_for_the_metrics(weights):
    with open(weights, "rb") as f:
        assert pickle.load(f)["method"] == "soco"


FIXTURE_CITYSCAPES = Path(__file__).parent / "fixtures" / "datasets" / "cityscapes"


@pytest.mark.parametrize(("prediction", "expected_ap50"), [("ground_truth", 100.0), ("nothing", 0.0), ("on_void", 0.0)])
def test_cityscapes_evaluator_scores_through_the_import_alias(tmp_path, monkeypatch, prediction, expected_ap50):
    """detectron2's evaluator imports cityscapesscripts under Meta's internal path (issue
    5436); with the alias it scores the fixture's one car: its own mask is a perfect match. A
    car predicted only on void pixels (all the fixture's other pixels) is ignored, which left
    cityscapesscripts nothing to rank (its issue 89, an IndexError): the car is missed, AP 0."""
    pytest.importorskip("cityscapesscripts")
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BitMasks, Instances, PolygonMasks

    dataset = {"root": str(FIXTURE_CITYSCAPES), "format": "cityscapes", "train_json": "gtFine/train",
               "train_images": "leftImg8bit/train", "val_json": "gtFine/val", "val_images": "leftImg8bit/val"}
    bench = benchmark("cityscapes", dataset=dataset, model="mask_rcnn")
    detectron2_backend.register_datasets(bench, tmp_path)
    (val_name,) = dataset_names(bench)[1]
    (image,) = DatasetCatalog.get(val_name)
    evaluator = detectron2_backend.build_evaluator(bench, val_name, tmp_path)
    evaluator.reset()
    instances = Instances((image["height"], image["width"]))
    (car,) = image["annotations"]
    polygons = PolygonMasks([car["segmentation"]])
    car_mask = BitMasks.from_polygon_masks(polygons, image["height"], image["width"]).tensor
    if prediction != "nothing":
        instances.pred_masks = car_mask if prediction == "ground_truth" else ~car_mask
        instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
        instances.pred_classes = torch.tensor([car["category_id"]])
        instances.scores = torch.tensor([0.9])
    else:
        instances.pred_masks = torch.zeros(0, image["height"], image["width"], dtype=torch.bool)
        instances.pred_classes = torch.zeros(0, dtype=torch.int64)
        instances.scores = torch.zeros(0)
    evaluator.process([image], [{"instances": instances}])
    monkeypatch.chdir(tmp_path)  # cityscapesscripts writes matches.json into the current directory
    assert evaluator.evaluate()["segm"]["AP50"] == pytest.approx(expected_ap50)
