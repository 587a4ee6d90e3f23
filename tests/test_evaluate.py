"""COCO metrics: known values on hand-made detections, parity with pycocotools, result format."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regioncl.transfer.torchvision_eval import METRIC_NAMES, coco_metrics, to_coco_detections

HEIGHT = WIDTH = 200
# (image_id, category_id, x, y, w, h): small (< 32^2), medium and large (> 96^2) objects.
GT_BOXES = [
    (1, 1, 10, 10, 20, 20),
    (1, 2, 50, 40, 60, 50),
    (2, 1, 20, 30, 110, 100),
    (2, 2, 150, 150, 40, 40),
    (3, 1, 60, 60, 40, 40),
    (3, 2, 5, 100, 120, 98),
]


def rectangle_rle(x: int, y: int, w: int, h: int) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def gt_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gt") / "instances_val.json"
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": WIDTH, "height": HEIGHT} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": n, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
             "iscrowd": 0, "segmentation": rectangle_rle(x, y, w, h)}
            for n, (i, c, x, y, w, h) in enumerate(GT_BOXES, start=1)
        ],
    }
    path.write_text(json.dumps(coco))
    return path


def detection(i: int, c: int, x: float, y: float, w: float, h: float, score: float = 1.0) -> dict:
    return {"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": score,
            "segmentation": rectangle_rle(round(x), round(y), round(w), round(h))}


def pycocotools_percent(gt_json: Path, detections: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        dets = copy.deepcopy(detections)
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox")
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v * 100) for v in evaluator.stats[:6]]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detections_score_100(gt_json: Path, iou_type: str) -> None:
    metrics = coco_metrics(gt_json, [detection(*box) for box in GT_BOXES], iou_type)
    assert list(metrics) == list(METRIC_NAMES)
    assert all(v == pytest.approx(100.0) for v in metrics.values())


def test_a_missing_class_halves_the_ap(gt_json: Path) -> None:
    only_class_1 = [detection(*box) for box in GT_BOXES if box[1] == 1]
    metrics = coco_metrics(gt_json, only_class_1, "bbox")
    assert metrics["AP"] == pytest.approx(50.0)
    assert metrics["AP50"] == pytest.approx(50.0)


def test_boxes_at_iou_063_count_for_ap50_only(gt_json: Path) -> None:
    # Shifting a box right by 0.23 of its width gives IoU 0.77 / 1.23 = 0.626 with its ground
    # truth: a hit at the IoU thresholds 0.50, 0.55 and 0.60, a miss at the 7 others.
    shifted = [detection(i, c, x + 0.23 * w, y, w, h) for i, c, x, y, w, h in GT_BOXES]
    metrics = coco_metrics(gt_json, shifted, "bbox")
    assert metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(30.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_matches_pycocotools_on_noisy_detections(gt_json: Path, iou_type: str) -> None:
    rng = np.random.default_rng(0)
    detections = []
    for i, c, x, y, w, h in GT_BOXES:
        jitter = rng.uniform(-0.2, 0.2, size=4) * [w, h, w, h]
        detections.append(detection(i, c, *np.clip([x, y, w, h] + jitter, 1, 150).tolist(), rng.uniform()))
        detections.append(detection(i, 3 - c, x, y, w, h, rng.uniform(0, 0.5)))  # wrong class
    metrics = coco_metrics(gt_json, detections, iou_type)
    expected = pycocotools_percent(gt_json, detections, iou_type)
    assert [metrics[name] for name in METRIC_NAMES] == pytest.approx(expected)
    assert 0.0 < metrics["AP"] < 100.0


def test_no_detections_score_zero(gt_json: Path) -> None:
    assert coco_metrics(gt_json, [], "bbox") == {name: 0.0 for name in METRIC_NAMES}


def test_size_ranges_without_ground_truth_are_none(gt_json: Path, tmp_path: Path) -> None:
    coco = json.loads(gt_json.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["area"] > 96**2]
    only_large = tmp_path / "large.json"
    only_large.write_text(json.dumps(coco))
    dets = [detection(*box) for box in GT_BOXES if box[4] * box[5] > 96**2]
    metrics = coco_metrics(only_large, dets, "bbox")
    assert metrics["APs"] is None and metrics["APm"] is None
    assert metrics["APl"] == pytest.approx(100.0)


def test_unknown_iou_type_is_rejected(gt_json: Path) -> None:
    with pytest.raises(ValueError, match="iou_type: 'keypoints'"):
        coco_metrics(gt_json, [], "keypoints")


def test_torchvision_output_becomes_coco_results() -> None:
    probabilities = torch.zeros(2, 1, 30, 40)
    probabilities[0, 0, 2:22, 1:11] = 0.9
    probabilities[1, 0, 5:8, 5:9] = 0.4  # below the 0.5 mask threshold
    output = {
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 9.0, 8.0]]),
        "labels": torch.tensor([2, 1]),
        "scores": torch.tensor([0.9, 0.3]),
        "masks": probabilities,
    }
    results = to_coco_detections(output, image_id=17, category_ids=[3, 7])
    assert [r["category_id"] for r in results] == [7, 3]
    assert results[0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    assert results[0]["image_id"] == 17 and results[0]["score"] == pytest.approx(0.9)
    first = mask_util.decode(results[0]["segmentation"])
    assert first.shape == (30, 40) and first.sum() == 200 and first[2:22, 1:11].all()
    assert mask_util.decode(results[1]["segmentation"]).sum() == 0
    json.dumps(results)  # plain JSON types only


def test_cityscapes_internal_import_path_resolves_to_the_public_package(monkeypatch) -> None:
    import sys
    import types

    from regioncl.transfer.cityscapes_compat import (
        ALIASED_MODULES,
        INTERNAL_PREFIX,
        alias_cityscapes_scripts,
    )

    fake = {name: types.ModuleType(name) for name in ALIASED_MODULES}
    fake["cityscapesscripts.helpers.labels"].trainId2label = {0: "road"}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.startswith("deeplearning")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        alias_cityscapes_scripts()
        # the statement detectron2's CityscapesInstanceEvaluator.process runs (issue 5436)
        from deeplearning.projects.cityscapesApi.cityscapesscripts.helpers.labels import (
            trainId2label,
        )

        assert trainId2label == {0: "road"}
    finally:
        for name in [n for n in sys.modules if n.startswith("deeplearning")]:
            del sys.modules[name]
    assert INTERNAL_PREFIX.startswith("deeplearning.")


def test_cityscapes_alias_names_the_missing_package(monkeypatch) -> None:
    import sys

    from regioncl.transfer.cityscapes_compat import alias_cityscapes_scripts

    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)  # None: "not importable"
    with pytest.raises(ModuleNotFoundError, match="pip install cityscapesscripts"):
        alias_cityscapes_scripts()


def test_detector_file_of_another_benchmark_or_format_is_refused_by_name(tmp_path: Path) -> None:
    import torch

    from regioncl.transfer.benchmarks import BenchmarkSettings
    from regioncl.transfer.records import load_finetuned_detector

    benchmark = BenchmarkSettings.from_dict({"name": "voc", "dataset": {"root": str(tmp_path)}})
    path = tmp_path / "model.pt"
    torch.save({"format": "regioncl.detector/1", "benchmark": "coco"}, path)
    with pytest.raises(ValueError, match=r"model\.pt: finetuned on benchmark 'coco', evaluating 'voc'"):
        load_finetuned_detector(path, "regioncl.detector/1", benchmark)
    with pytest.raises(ValueError, match=r"model\.pt: expected format 'regioncl.detector_d2/1'"):
        load_finetuned_detector(path, "regioncl.detector_d2/1", benchmark)
    torch.save({"format": "regioncl.detector/1", "benchmark": "voc"}, path)
    assert load_finetuned_detector(path, "regioncl.detector/1", benchmark)["benchmark"] == "voc"


# --- The whole evaluation path (regioncl.transfer.torchvision_backend.evaluate) with an oracle detector ---
# Category ids that are not 1..K: a label <-> category mix-up cannot score by luck.
ORACLE_CATEGORIES = {1: 3, 2: 7}  # GT_BOXES' class -> COCO category id in the oracle's dataset


@pytest.fixture(scope="module")
def oracle_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO val split of GT_BOXES: images val/<id>.png whose every pixel holds the image id."""
    root = tmp_path_factory.mktemp("oracle_coco")
    (root / "val").mkdir()
    (root / "annotations").mkdir()
    for image_id in (1, 2, 3):
        Image.fromarray(np.full((HEIGHT, WIDTH, 3), image_id, np.uint8)).save(root / "val" / f"{image_id}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in (1, 2, 3)],
        "categories": [{"id": c, "name": f"c{c}"} for c in sorted(ORACLE_CATEGORIES.values())],
        "annotations": [
            {"id": n, "image_id": i, "category_id": ORACLE_CATEGORIES[c], "bbox": [x, y, w, h], "area": w * h,
             "iscrowd": 0, "segmentation": rectangle_rle(x, y, w, h)}
            for n, (i, c, x, y, w, h) in enumerate(GT_BOXES, start=1)
        ],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root


class OracleDetector(torch.nn.Module):
    """Returns each image's ground truth in torchvision's output format (boxes x1y1x2y2 in image
    pixels, labels 1..K in order of COCO category id, scores, masks (N, 1, H, W) probabilities),
    or nothing at all. It knows an image by the id in its pixels, not by the order of the calls."""

    def __init__(self, gt_json: Path, *, silent: bool) -> None:
        super().__init__()
        coco = json.loads(gt_json.read_text())
        labels = {c: label for label, c in enumerate(sorted(c["id"] for c in coco["categories"]), start=1)}
        self.truth: dict[int, list[tuple[list[float], int, np.ndarray]]] = {i["id"]: [] for i in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            mask = mask_util.decode(a["segmentation"])  # (H, W) uint8
            self.truth[a["image_id"]].append(([x, y, x + w, y + h], labels[a["category_id"]], mask))
        self.silent = silent

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:  # (3, H, W) in 0..1
            objects = [] if self.silent else self.truth[round(image[0, 0, 0].item() * 255)]
            masks = np.stack([mask for _, _, mask in objects]) if objects else np.zeros((0, HEIGHT, WIDTH))
            outputs.append({
                "boxes": torch.tensor([box for box, _, _ in objects], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label for _, label, _ in objects], dtype=torch.int64),
                "scores": torch.ones(len(objects)),
                "masks": torch.from_numpy(masks).float()[:, None],  # (N, 1, H, W) probabilities
            })
        return outputs


@pytest.mark.parametrize(("silent", "expected"), [(False, 100.0), (True, 0.0)], ids=["ground_truth", "nothing"])
def test_evaluating_a_detector_that_returns_the_ground_truth_gives_100_and_one_that_returns_nothing_0(
    oracle_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent: bool, expected: float
) -> None:
    from regioncl.transfer import torchvision_backend
    from regioncl.transfer.benchmarks import BenchmarkSettings
    from regioncl.transfer.torchvision_backend import DETECTOR_FORMAT

    benchmark = BenchmarkSettings.from_dict(
        {"name": "oracle", "dataset": {"root": str(oracle_dataset)}, "device": "cpu", "model": "mask_rcnn",
         "arch": "resnet18", "eval": {"batch_size": 2}}
    )
    model_path = tmp_path / "model.pt"
    torch.save(
        {"format": DETECTOR_FORMAT, "benchmark": "oracle", "state_dict": {}, "seed": 0, "weights": None,
         "method": "random", "category_ids": sorted(ORACLE_CATEGORIES.values())},
        model_path,
    )
    # Only the network is swapped: loading the file, the dataset, predict, the COCO conversion,
    # COCOeval and the record are the real path.
    oracle = OracleDetector(benchmark.dataset.path("val_json"), silent=silent)
    monkeypatch.setattr(torchvision_backend, "build_detector", lambda settings, num_classes: oracle)
    record = torchvision_backend.evaluate(benchmark, model_path, tmp_path / "metrics.json", run="oracle")
    for iou_type in ("bbox", "segm"):
        assert record["metrics"][iou_type] == {name: pytest.approx(expected) for name in METRIC_NAMES}, iou_type
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == record["metrics"]
