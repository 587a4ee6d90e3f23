"""COCO-style evaluation of a finetuned detector (pycocotools' COCOeval), in percent.

Metrics follow the papers (and detectron2's COCOEvaluator): AP (mean over IoU .50:.95), AP50,
AP75, APs, APm, APl, each x 100. A size range without ground truth has no AP: ``None``. A
model without a single detection scores 0.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
import torchvision
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from regioncl.transfer.benchmarks import (
    BenchmarkSettings,
    load_finetuned_detector,
    write_metrics_record,
)
from regioncl.transfer.coco_data import CocoDetection, load_coco
from regioncl.transfer.torchvision_backend import (
    DETECTOR_FORMAT,
    build_detector,
    select_device,
)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
MASK_THRESHOLD = 0.5  # torchvision's mask probabilities -> binary masks, as detectron2


def coco_metrics(gt_json: Path, detections: list[dict], iou_type: str) -> dict[str, float | None]:
    """Score COCO-format ``detections`` (``image_id``, ``category_id``, ``score`` and ``bbox``
    [x, y, w, h] or RLE ``segmentation``) against ``gt_json``; percent, as ``METRIC_NAMES``."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type: {iou_type!r} is not one of ['bbox', 'segm']")
    if not detections:
        return {name: 0.0 for name in METRIC_NAMES}
    coco_gt = load_coco(gt_json)
    if iou_type == "segm":
        # Without a box, loadRes takes the area from the mask (as detectron2 does for segm).
        detections = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
    with contextlib.redirect_stdout(sys.stderr):
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: float(value * 100) if value >= 0 else None
        for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)])
    }


def to_coco_detections(
    output: dict[str, torch.Tensor], image_id: int, category_ids: list[int]
) -> list[dict[str, Any]]:
    """One image's torchvision output (boxes x1y1x2y2 in original pixels, labels 1..K, scores,
    optional masks (N, 1, H, W) probabilities; on any device) as COCO result dicts."""
    boxes = output["boxes"].tolist()
    labels = output["labels"].tolist()
    scores = output["scores"].tolist()
    rles = []
    if "masks" in output:
        binary = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    results = []
    for i, ((x1, y1, x2, y2), label, score) in enumerate(zip(boxes, labels, scores)):
        result = {
            "image_id": image_id,
            "category_id": category_ids[label - 1],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": score,
        }
        if rles:
            result["segmentation"] = {
                "size": rles[i]["size"],
                "counts": rles[i]["counts"].decode("ascii"),
            }
        results.append(result)
    return results


@torch.no_grad()
def predict(model: torch.nn.Module, data: CocoDetection, batch_size: int, device: torch.device) -> list[dict]:
    """COCO result dicts for every image of ``data``, run on ``device`` (the model's)."""
    model.eval()
    detections = []
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", file=sys.stderr, dynamic_ncols=True):
        indices = range(start, min(start + batch_size, len(data)))
        outputs = model([data.load_image(i).to(device) for i in indices])
        for i, output in zip(indices, outputs):
            detections += to_coco_detections(output, data.image_ids[i], data.category_ids)
    return detections


def load_detector(benchmark: BenchmarkSettings, model_path: Path) -> tuple[torch.nn.Module, dict]:
    saved = load_finetuned_detector(model_path, DETECTOR_FORMAT, benchmark)
    model = build_detector(benchmark, num_classes=len(saved["category_ids"]))
    model.load_state_dict(saved["state_dict"])
    return model, saved


def evaluate(
    benchmark: BenchmarkSettings,
    model_path: Path,
    out: Path,
    *,
    run: str | None = None,
    method: str | None = None,
) -> dict:
    """Run the detector on the benchmark's val split (on ``benchmark.device``), score it, write
    and return the record.

    ``run`` and ``method`` label the record for the tables; ``method`` defaults to the one the
    detector's weights came from ("random" without pretraining).
    """
    device = select_device(benchmark)
    model, saved = load_detector(benchmark, model_path)
    gt_json = benchmark.dataset.path("val_json")
    data = CocoDetection(gt_json, benchmark.dataset.path("val_images"), with_masks=False)
    if data.category_ids != saved["category_ids"]:
        raise ValueError(
            f"{gt_json}: categories {data.category_ids} differ from those the model was "
            f"trained on {saved['category_ids']}"
        )
    detections = predict(model.to(device), data, benchmark.eval.batch_size, device)
    metrics = {t: coco_metrics(gt_json, detections, t) for t in benchmark.iou_types}
    return write_metrics_record(
        out, benchmark, model_path, saved, metrics, run=run, method=method,
        versions={"torchvision": torchvision.__version__},
    )
