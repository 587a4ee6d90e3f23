"""The detectron2 backend with detectron2 itself: converted weights load into its R50-C4 and
R50-FPN detectors, and 2-iteration finetunes + evaluations run on the CPU (skipped without it)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from regioncl.convert import convert_checkpoint  # noqa: E402
from regioncl.transfer import detectron2_backend  # noqa: E402
from regioncl.transfer.benchmarks import BenchmarkSettings  # noqa: E402
from regioncl.transfer.detectron2_config import dataset_names, detectron2_options  # noqa: E402

FIXTURE_COCO = Path(__file__).parent / "fixtures" / "datasets" / "coco"


def write_pretrained(path: Path, transfer: dict | None = None) -> Path:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).state_dict()
    backbone = {k: v for k, v in resnet.items() if not k.startswith("fc.")}
    torch.save(
        {"format": "regioncl.pretrained/1", "method": "soco", "arch": "resnet50", "steps": 1, "epochs": 1,
         "backbone": backbone, "transfer": transfer or {}, "config": {}},
        path,
    )
    return path


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
        # few RoIs: the C4 head runs res5 on every sampled RoI (512 per image by default)
        "heads": {"fpn_channels": 32, "box_head_dim": 64, "mask_head_channels": 16, "roi_batch_size_per_image": 32,
                  "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                  "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50},
        "input": {"min_size": [128], "max_size": 160},
        "solver": {"batch_size": 2, "iterations": 2, "warmup_iters": 1, "lr": 0.001, "lr_steps": [1],
                   "checkpoint_every": 1000},
        **overrides,
    }
    return BenchmarkSettings.from_dict(data)


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
def test_converted_pkl_fills_every_backbone_weight(tmp_path, name, overrides):
    ckpt = write_pretrained(tmp_path / "ckpt.pt")
    convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    cfg = detectron2_backend.build_cfg(benchmark(name, **overrides), num_classes=1)
    model = build_model(cfg)
    keys = incompatible_keys(model, tmp_path / "w.d2.pkl")
    resnet = resnet_keys(model)
    assert len(resnet) == 265  # R50: 53 convs + 53 norms x 4 tensors; C4 holds res5 in its head
    assert sorted(set(keys.missing_keys) & resnet) == []
    assert keys.incorrect_shapes == [] and keys.unexpected_keys == []


def test_soco_fpn_and_box_head_fill_the_detector(tmp_path):
    bench = benchmark("soco", fpn_norm="bn", box_head="4conv1fc", head_norm="bn")
    cfg = detectron2_backend.build_cfg(bench, num_classes=1)
    model = build_model(cfg)
    state = model.state_dict()
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
    ckpt = write_pretrained(tmp_path / "ckpt.pt", {"fpn": tv_fpn, "box_head": head})
    convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    detector = build_model(cfg)
    keys = incompatible_keys(detector, tmp_path / "w.d2.pkl")
    assert not [k for k in keys.missing_keys if k.startswith(("backbone.", "roi_heads.box_head."))]
    assert keys.unexpected_keys == [] and keys.incorrect_shapes == []
    loaded = detector.state_dict()
    # 8 FPN convs and 4 head convs, each a weight (no bias before a norm) and 5 BN tensors; fc1
    assert len(fpn) == 8 * 6 and len(head) == 4 * 6 + 2
    assert all(torch.equal(loaded[f"backbone.{k}"], v) for k, v in fpn.items())
    assert all(torch.equal(loaded[f"roi_heads.box_head.{k}"], v) for k, v in head.items())


@pytest.mark.parametrize(
    ("name", "overrides", "tasks"),
    [
        ("c4", {"fpn": False, "model": "mask_rcnn"}, {"bbox", "segm"}),
        ("fpn", {"model": "faster_rcnn"}, {"bbox"}),
        ("retina", {"model": "retinanet"}, {"bbox"}),
    ],
)
def test_two_iteration_finetune_and_evaluation_on_the_cpu(tmp_path, name, overrides, tasks):
    ckpt = write_pretrained(tmp_path / "ckpt.pt")
    convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    bench = benchmark(name, **overrides)
    model_path = tmp_path / "model.pt"
    detectron2_backend.finetune(bench, tmp_path / "w.d2.pkl", 0, model_path, tmp_path / "work", num_workers=0)
    record = detectron2_backend.evaluate(bench, model_path, tmp_path / "metrics.json", run="r", num_workers=0)
    assert set(record["metrics"]) == tasks
    assert record["method"] == "soco" and record["seed"] == 0 and "detectron2" in record["versions"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == record
    # resuming a finished run trains nothing more and leaves the same weights
    before = torch.load(model_path, weights_only=True)["model"]
    detectron2_backend.finetune(bench, tmp_path / "w.d2.pkl", 0, model_path, tmp_path / "work", num_workers=0)
    after = torch.load(model_path, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_options_merge_into_detectron2_defaults():
    bench = benchmark("c4", fpn=False, model="faster_rcnn", res5_extra_norm=True)
    cfg = detectron2_backend.build_cfg(bench, num_classes=1)
    options = detectron2_options(bench, 1)
    assert cfg.MODEL.ROI_HEADS.NAME == options["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
    model = build_model(cfg)
    assert any(name.startswith("roi_heads.res5.norm") for name, _ in model.named_parameters())


def test_workdir_of_another_run_is_refused(tmp_path):
    bench = benchmark("fpn", model="faster_rcnn")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "identity.json").write_text(json.dumps({"benchmark": "other", "seed": 0, "weights": "none"}))
    with pytest.raises(ValueError, match=r"holds checkpoints of .*'other'"):
        detectron2_backend.finetune(bench, None, 0, tmp_path / "m.pt", tmp_path / "work", num_workers=0)


def test_pkl_records_method_for_the_metrics(tmp_path):
    convert_checkpoint(write_pretrained(tmp_path / "c.pt"), tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    with open(tmp_path / "w.d2.pkl", "rb") as f:
        assert pickle.load(f)["method"] == "soco"


FIXTURE_CITYSCAPES = Path(__file__).parent / "fixtures" / "datasets" / "cityscapes"


@pytest.mark.parametrize(("predict_ground_truth", "expected_ap50"), [(True, 100.0), (False, 0.0)])
def test_cityscapes_evaluator_scores_through_the_import_alias(tmp_path, monkeypatch, predict_ground_truth, expected_ap50):
    """detectron2's evaluator imports cityscapesscripts under Meta's internal path (issue
    5436); with the alias it scores the fixture's one car: its own mask is a perfect match."""
    pytest.importorskip("cityscapesscripts")
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

    dataset = {"root": str(FIXTURE_CITYSCAPES), "format": "cityscapes", "train_json": "gtFine/train",
               "train_images": "leftImg8bit/train", "val_json": "gtFine/val", "val_images": "leftImg8bit/val"}
    bench = benchmark("cityscapes", dataset=dataset, model="mask_rcnn")
    detectron2_backend.register_datasets(bench, tmp_path)
    (val_name,) = dataset_names(bench)[1]
    (image,) = DatasetCatalog.get(val_name)
    evaluator = detectron2_backend.build_evaluator(bench, val_name, tmp_path)
    evaluator.reset()
    instances = Instances((image["height"], image["width"]))
    if predict_ground_truth:
        (car,) = image["annotations"]
        polygons = PolygonMasks([car["segmentation"]])
        instances.pred_masks = BitMasks.from_polygon_masks(polygons, image["height"], image["width"]).tensor
        instances.pred_boxes = Boxes(polygons.get_bounding_boxes().tensor)
        instances.pred_classes = torch.tensor([car["category_id"]])
        instances.scores = torch.tensor([0.9])
    else:
        instances.pred_masks = torch.zeros(0, image["height"], image["width"], dtype=torch.bool)
        instances.pred_classes = torch.zeros(0, dtype=torch.int64)
        instances.scores = torch.zeros(0)
    evaluator.process([image], [{"instances": instances}])
    monkeypatch.chdir(tmp_path)  # cityscapesscripts writes matches.json into the current directory
    assert evaluator.evaluate()["segm"]["AP50"] == pytest.approx(expected_ap50)
