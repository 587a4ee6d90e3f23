"""The torchvision backend's evaluator: a torchvision detector's outputs on a COCO-format split
as COCO results, scored by pycocotools' COCOeval, in percent.

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
from pycocotools.cocoeval import COCOeval

from regioncl.progress import Progress
from regioncl.transfer.coco_data import CocoDetection, load_coco

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
    progress = Progress(len(starts), desc="evaluate (batches)")
    for done, start in enumerate(starts, start=1):
        indices = range(start, min(start + batch_size, len(data)))
        outputs = model([data.load_image(i).to(device) for i in indices])
        for i, output in zip(indices, outputs):
            detections += to_coco_detections(output, data.image_ids[i], data.category_ids)
        progress.update(done)
    progress.close()
    return detections
