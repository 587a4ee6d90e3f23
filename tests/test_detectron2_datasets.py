"""VOC, LVIS and Cityscapes through the detectron2 backend end to end: the registry's benchmark
(config/benchmarks/*.yaml) on the dataset fixture, shrunk for the CPU (128 px input, few RoIs,
2 iterations, no precise BN), finetuned from converted weights and scored by detectron2's own
evaluator (PascalVOCDetectionEvaluator, LVISEvaluator, CityscapesInstanceEvaluator). Each test
skips without detectron2 or the dataset's evaluation package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks
from test_detectron2 import CPU_SETTINGS, assert_scored, converted_weights

from regioncl.data.layouts import DatasetSpec
from regioncl.transfer import detectron2_backend
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.detectron2_config import dataset_names
from regioncl.transfer.registry import load_registry, resolve_benchmark

FIXTURE_DATASETS = Path(__file__).parent / "fixtures" / "datasets"
# The registry's settings, with CPU sizes (test_detectron2.CPU_SETTINGS) and without precise
# BN, which would run 200 more forward passes.
CPU_OVERRIDES = {**CPU_SETTINGS, "precise_bn": False}


def registered_benchmark(name: str) -> BenchmarkSettings:
    """The registered benchmark ``name`` on its layout's fixture, shrunk for the CPU, resolved as
    the workflow resolves a config entry ``{protocol: name, ...}``."""
    (layout,) = load_registry().get(name).layouts
    spec = DatasetSpec(name=layout, layout=layout, root=FIXTURE_DATASETS / layout)
    spec.check()
    return BenchmarkSettings.from_dict(resolve_benchmark(name, {"protocol": name, **CPU_OVERRIDES}, spec))


def finetune_and_evaluate(name: str, tmp_path: Path) -> dict:
    bench = registered_benchmark(name)
    weights = converted_weights(tmp_path)
    model_path = tmp_path / "model.pt"
    detectron2_backend.finetune(bench, weights, 0, model_path, tmp_path / "work", num_workers=0)
    record = detectron2_backend.evaluate(bench, model_path, tmp_path / "metrics.json", run="r", num_workers=0)
    assert (record["benchmark"], record["seed"], record["weights"]) == (name, 0, str(weights))
    return record


def test_voc_c4_finetune_is_scored_by_the_pascal_voc_evaluator(tmp_path):
    bench = registered_benchmark("voc0712_frcnn_r50c4_24k")
    assert (bench.fpn, bench.res5_extra_norm, len(bench.dataset.extra_train)) == (False, True, 1)  # C4, VOC07+12
    record = finetune_and_evaluate("voc0712_frcnn_r50c4_24k", tmp_path)
    # PascalVOCDetectionEvaluator: AP (mean over IoU .50:.95), AP50, AP75 of boxes, nothing else
    assert {task: set(values) for task, values in record["metrics"].items()} == {"bbox": {"AP", "AP50", "AP75"}}
    assert_scored(record, {"bbox": {"AP", "AP50", "AP75"}})


def test_lvis_finetune_is_scored_by_the_lvis_evaluator(tmp_path):
    pytest.importorskip("lvis")
    bench = registered_benchmark("lvis_v1_mrcnn_r50fpn_1x")
    assert (bench.sampler, bench.with_masks) == ("repeat_factor", True)
    record = finetune_and_evaluate("lvis_v1_mrcnn_r50fpn_1x", tmp_path)
    # the fixture's val split has a rare, a common and a frequent category
    names = {"AP", "AP50", "AP75", "APr", "APc", "APf"}
    assert_scored(record, {"bbox": names, "segm": names})


def ground_truth_as_predictions(image: dict) -> Instances:
    """A detector's output that is the image's own annotations (boxes, classes, masks), score 1."""
    objects = image["annotations"]
    height, width = image["height"], image["width"]
    instances = Instances((height, width))
    boxes = [BoxMode.convert(o["bbox"], o["bbox_mode"], BoxMode.XYXY_ABS) for o in objects]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.pred_classes = torch.tensor([o["category_id"] for o in objects])
    instances.scores = torch.ones(len(objects))
    polygons = PolygonMasks([o["segmentation"] for o in objects])
    instances.pred_masks = BitMasks.from_polygon_masks(polygons, height, width).tensor
    return instances


def test_lvis_evaluator_scores_the_ground_truth_100_in_every_frequency_group(tmp_path):
    """Through the NumPy 2 patch of lvis, with LVIS v1's 1-based category ids restored; groups
    without ground truth (medium, large objects) are None, not lvis' -1."""
    pytest.importorskip("lvis")
    bench = registered_benchmark("lvis_v1_mrcnn_r50fpn_1x")
    detectron2_backend.register_datasets(bench, tmp_path)
    (val_name,) = dataset_names(bench)[1]
    evaluator = detectron2_backend.build_evaluator(bench, val_name, tmp_path)
    evaluator.reset()
    for image in DatasetCatalog.get(val_name):
        evaluator.process([image], [{"instances": ground_truth_as_predictions(image)}])
    metrics = detectron2_backend.summary_metrics(evaluator.evaluate())
    perfect = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APr", "APc", "APf"), pytest.approx(100.0))
    assert metrics == {task: {**perfect, "APm": None, "APl": None} for task in ("bbox", "segm")}


def test_cityscapes_finetune_is_scored_by_the_cityscapes_instance_evaluator(tmp_path):
    pytest.importorskip("cityscapesscripts")
    pytest.importorskip("shapely")  # detectron2's Cityscapes loader reads polygons with it
    record = finetune_and_evaluate("cityscapes_mrcnn_r50fpn_24k", tmp_path)
    # CityscapesInstanceEvaluator: mask AP and AP50
    assert {task: set(values) for task, values in record["metrics"].items()} == {"segm": {"AP", "AP50"}}
    assert_scored(record, {"segm": {"AP", "AP50"}})
