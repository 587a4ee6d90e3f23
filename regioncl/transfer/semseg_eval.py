"""Semantic-segmentation metrics from a confusion matrix, as detectron2's SemSegEvaluator.

    confusion[g, p] = pixels of ground-truth class g predicted as class p   (ignored pixels left out)
    IoU_c = confusion[c, c] / (sum_p confusion[c, p] + sum_g confusion[g, c] - confusion[c, c])
    mIoU  = mean of IoU_c over the classes with ground-truth pixels
    pACC  = sum_c confusion[c, c] / sum confusion          (pixel accuracy)
    mACC  = mean over those classes of confusion[c, c] / sum_p confusion[c, p]
    fwIoU = sum_c IoU_c * (ground-truth pixels of c) / (all ground-truth pixels)

A class without ground-truth pixels has no IoU (``None``) and stays out of the means even when
it is predicted (its false positives still lower the IoU of the classes they cover), exactly as
detectron2's ``SemSegEvaluator.evaluate`` (``iou_valid = acc_valid & (union > 0)``, where
``acc_valid = pos_gt > 0``). All values in percent.
"""

from __future__ import annotations

import torch

from regioncl.transfer.semseg_data import IGNORE_LABEL


def confusion_matrix(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows ground truth, columns prediction, of ``prediction`` (any shape,
    class ids 0..C-1) against ``label`` (same shape, class ids or ``IGNORE_LABEL``); raises on a
    label that is neither (a broken label mapping)."""
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    counted = label != IGNORE_LABEL
    truth, predicted = label[counted].long(), prediction[counted].long()
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1} and {IGNORE_LABEL}: {sorted(set(truth.unique().tolist()))}")
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def sem_seg_metrics(confusion: torch.Tensor, class_names: tuple[str, ...]) -> dict[str, float | None]:
    """mIoU, fwIoU, mACC, pACC and ``IoU-<class>`` per class (percent; None where undefined)."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    ground_truth = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    union = ground_truth + predicted - true_positives
    valid = ground_truth > 0
    iou = torch.where(valid, true_positives / union.clamp(min=1), torch.nan)
    accuracy = torch.where(valid, true_positives / ground_truth.clamp(min=1), torch.nan)
    total = ground_truth.sum()
    if not valid.any():
        summary: dict[str, float | None] = {"mIoU": None, "fwIoU": None, "mACC": None, "pACC": None}
    else:
        summary = {
            "mIoU": 100 * iou[valid].mean().item(),
            "fwIoU": 100 * (iou[valid] * ground_truth[valid] / total).sum().item(),
            "mACC": 100 * accuracy[valid].mean().item(),
            "pACC": 100 * (true_positives.sum() / total).item(),
        }
    per_class = {f"IoU-{name}": (100 * value if value == value else None) for name, value in zip(class_names, iou.tolist())}
    return {**summary, **per_class}
