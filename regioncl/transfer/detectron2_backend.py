"""Finetune and evaluate a benchmark with detectron2's own trainer, data and evaluators.

Import this module only when a benchmark has ``backend: detectron2`` (``regioncl.transfer.
backends`` does): detectron2 is optional and imported at the top here.

- Config: ``build_cfg`` = detectron2's defaults + ``detectron2_config.detectron2_options``.
- Data: every split is registered under ``dataset_names(benchmark)`` from the benchmark's
  explicit paths (COCO / LVIS JSON, VOC image-set lists, Cityscapes gtFine), so any dataset root
  works, not only $DETECTRON2_DATASETS; a semi-supervised benchmark registers its subset JSON.
  Masks travel as polygons (the papers' configs) unless the COCO-format training data holds RLE
  masks (the embedded dataset), which detectron2 carries only as bitmasks (``mask_format_of``).
- Training: ``DefaultTrainer`` (its optimizer, WarmupMultiStepLR, PreciseBN and periodic
  checkpoints) in ``workdir/<identity key>`` (``regioncl.transfer.identity``: other settings or
  other weights bytes start afresh); ``resume_or_load(resume=True)`` continues from its last
  checkpoint, else loads the converted ``.pkl``, which is first read with the restricted
  unpickler of ``regioncl.weights`` (a file that would run code is refused
  before detectron2 unpickles it) and checked against the detector's keys by the torchvision
  backend's rules (``pretrained_for``, ``regioncl.transfer.loading``: a backbone tensor it
  lacks, or one without a place or of another shape, is an error naming the keys; what it
  leaves out on purpose is named on stderr). ``launch`` spreads it over GPUs/machines.
- Evaluation: COCOEvaluator, LVISEvaluator, PascalVOCDetectionEvaluator or
  CityscapesInstanceEvaluator by dataset format (LVIS needs ``lvis``, Cityscapes
  ``cityscapesscripts``: both patched for NumPy 2 on first use, Cityscapes also for its import
  path); the record (``regioncl.transfer.records``) has the torchvision backend's shape (metrics in percent per IoU type, None where undefined,
  with benchmark, weights, seed and versions).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import detectron2
import numpy
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.datasets import (
    register_coco_instances,
    register_lvis_instances,
    register_pascal_voc,
)
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    COCOEvaluator,
    DatasetEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
)
from detectron2.layers import get_norm
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from regioncl.convert import has_fpn_norm, select_modules
from regioncl.curves import publish_detectron2_metrics
from regioncl.io import atomic_path, read_json, write_json_atomic
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.cityscapes_compat import LegacyNumpy, alias_cityscapes_scripts
from regioncl.transfer.detectron2_config import (
    FORMAT_NUM_CLASSES,
    dataset_names,
    detectron2_options,
    flat_option_list,
)
from regioncl.transfer.identity import finetune_identity
from regioncl.transfer.loading import check_loadable, detectron2_load_check, report_left_out, shapes_of
from regioncl.transfer.records import load_finetuned_detector, write_metrics_record
from regioncl.transfer.subsets import training_annotations
from regioncl.weights import check_same_run, read_detectron2_weights, write_detectron2_weights

DETECTRON2_DETECTOR_FORMAT = "regioncl.detectron2-detector/1"
IDENTITY_FILE = "identity.json"  # what the workdir's checkpoints were trained for
# Settings a checkpoint may be resumed across: detectron2's schedulers are built from the
# iteration count, so unlike the torchvision backend's, every other setting is the identity's.
RESUME_MAY_CHANGE = ("solver.checkpoint_every",)
# Cityscapes classes with instances, in cityscapesscripts' label order (detectron2's builtin
# metadata; load_cityscapes_instances maps label ids to these contiguous ids).
CITYSCAPES_THING_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
# Summary metrics kept from the evaluators' results (per-class "AP-<name>" entries are dropped).
SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """MoCo's C4 RoI head (its detection/train_net.py): res5 followed by one more norm layer of
    ``MODEL.RESNETS.NORM``, so the head's output is normalised like the backbone's."""

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def num_classes_of(benchmark: BenchmarkSettings) -> int:
    """Fixed for VOC / Cityscapes / LVIS; counted from the evaluation JSON for COCO-format data."""
    fmt = benchmark.dataset.format
    if fmt in FORMAT_NUM_CLASSES:
        return FORMAT_NUM_CLASSES[fmt]
    return len(read_json(benchmark.dataset.path("val_json"))["categories"])


def mask_format_of(benchmark: BenchmarkSettings) -> str:
    """detectron2's ``INPUT.MASK_FORMAT`` for the benchmark's training masks: ``polygon`` (the
    papers' configs) unless a COCO-format training split gives an object it trains on (crowd
    regions are dropped) an RLE mask, which only ``bitmask`` carries: the embedded dataset's
    masks are RLE. VOC has no masks; LVIS and Cityscapes (read ``to_polygons``) are polygons."""
    if not benchmark.with_masks or benchmark.dataset.format != "coco":
        return "polygon"
    for split_json, _ in benchmark.dataset.train_splits():
        objects = read_json(split_json)["annotations"]
        if any(isinstance(o.get("segmentation"), dict) and not o.get("iscrowd", 0) for o in objects):
            return "bitmask"
    return "polygon"


def build_cfg(
    benchmark: BenchmarkSettings,
    num_classes: int,
    seed: int = 0,
    output_dir: str = "",
    weights: str = "",
    device: str = "cpu",
    num_workers: int = 2,
    mask_format: str = "polygon",
) -> CfgNode:
    """detectron2's default config with the benchmark's options merged in."""
    cfg = get_cfg()
    options = detectron2_options(benchmark, num_classes, seed, output_dir, mask_format)
    cfg.merge_from_list(flat_option_list(options))
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = device
    cfg.DATALOADER.NUM_WORKERS = num_workers
    return cfg


def load_cityscapes_split(images: Path, gt_dir: Path) -> list[dict]:
    """detectron2's Cityscapes instance loader, with the internal import path aliased first:
    the loader imports it too, in the parent and in the worker processes its pool forks (which
    inherit the alias from ``sys.modules``)."""
    alias_cityscapes_scripts()
    return load_cityscapes_instances(str(images), str(gt_dir), from_json=True, to_polygons=True)


def _register_split(name: str, fmt: str, annotations: Path, images: Path) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if fmt == "coco":
        register_coco_instances(name, {}, str(annotations), str(images))
    elif fmt == "lvis":
        # images = the COCO root: detectron2 appends "train2017/<file>" from each image's coco_url
        # to it as a string, so it must end with a separator
        register_lvis_instances(name, get_lvis_instances_meta("lvis_v1"), str(annotations), os.path.join(images, ""))
    elif fmt == "voc":
        # annotations = <root>/VOC<year>/ImageSets/Main/<split>.txt
        voc_dir = annotations.parents[2]
        register_pascal_voc(name, str(voc_dir), annotations.stem, int(voc_dir.name[-4:]))
    else:  # cityscapes: annotations = gtFine/<split>, images = leftImg8bit/<split>
        # absolute: the evaluation runs inside its workdir (see evaluate)
        images, annotations = images.absolute(), annotations.absolute()
        DatasetCatalog.register(name, lambda: load_cityscapes_split(images, annotations))
        MetadataCatalog.get(name).set(
            thing_classes=list(CITYSCAPES_THING_CLASSES),
            image_dir=str(images),
            gt_dir=str(annotations),
            evaluator_type="cityscapes_instance",
        )


def register_datasets(benchmark: BenchmarkSettings, workdir: Path) -> None:
    """Register the benchmark's train splits (the first one subsampled to ``train_fraction``)
    and its evaluation split under ``dataset_names(benchmark)``."""
    data = benchmark.dataset
    train_names, (val_name,) = dataset_names(benchmark)
    splits = list(data.train_splits())
    if benchmark.train_fraction < 1.0:
        first, images = splits[0]
        splits[0] = (training_annotations(first, benchmark.train_fraction, benchmark.subset_seed, workdir), images)
    for name, (split_json, images) in zip(train_names, splits):
        _register_split(name, data.format, split_json, images)
    _register_split(val_name, data.format, data.path("val_json"), data.path("val_images"))


def lvis_eval_for_numpy2() -> None:
    """lvis 0.5.3 (the latest) accumulates its precision with ``np.float``, which NumPy 1.24
    removed: give its evaluation module a numpy that still has it (``cityscapes_compat.
    LegacyNumpy``). Raises ModuleNotFoundError naming the package when ``lvis`` is missing."""
    try:
        import lvis.eval
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the LVIS evaluator needs the 'lvis' package (pip install --no-deps lvis: docs/transfer.md)"
        ) from error
    if not hasattr(numpy, "float") and lvis.eval.np is numpy:
        lvis.eval.np = LegacyNumpy("numpy")


def build_evaluator(benchmark: BenchmarkSettings, dataset_name: str, output_dir: Path) -> DatasetEvaluator:
    fmt = benchmark.dataset.format
    if fmt == "voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if fmt == "cityscapes":
        alias_cityscapes_scripts()
        return CityscapesInstanceEvaluator(dataset_name)
    if fmt == "lvis":
        lvis_eval_for_numpy2()
        return LVISEvaluator(
            dataset_name,
            tasks=benchmark.iou_types,
            output_dir=str(output_dir),
            max_dets_per_image=benchmark.eval.detections_per_image,
        )
    return COCOEvaluator(dataset_name, tasks=benchmark.iou_types, output_dir=str(output_dir))


class BenchmarkTrainer(DefaultTrainer):
    """detectron2's trainer without its end-of-training evaluation (the evaluate rule's job)."""

    def build_hooks(self) -> list:
        return [hook for hook in super().build_hooks() if not isinstance(hook, hooks.EvalHook)]


def _check_identity(workdir: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume checkpoints trained for another identity (put there by hand)."""
    path = workdir / IDENTITY_FILE
    if path.is_file():
        check_same_run(workdir, read_json(path), identity, may_change=("weights",))
    else:
        write_json_atomic(path, identity)


def _train_worker(
    benchmark_dict: dict,
    weights: str,
    method: str,
    seed: int,
    out: str,
    workdir: str,
    device: str,
    num_workers: int,
    mask_format: str,
) -> None:
    benchmark = BenchmarkSettings.from_dict(benchmark_dict)
    setup_logger(workdir, distributed_rank=comm.get_rank(), name="detectron2")
    seed_all_rng(seed + comm.get_rank())
    register_datasets(benchmark, Path(workdir))
    cfg = build_cfg(benchmark, num_classes_of(benchmark), seed, workdir, weights, device, num_workers, mask_format)
    trainer = BenchmarkTrainer(cfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter > 0 and comm.is_main_process():
        print(f"finetune {benchmark.name} seed {seed}: resuming from iteration {trainer.start_iter} ({workdir})", file=sys.stderr)
    trainer.train()
    if comm.is_main_process():
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        with atomic_path(Path(out)) as tmp:
            torch.save(
                {
                    "format": DETECTRON2_DETECTOR_FORMAT,
                    "benchmark": benchmark.name,
                    "seed": seed,
                    "weights": weights or "none",
                    "method": method,
                    "model": model.state_dict(),
                    "config": cfg.dump(),
                },
                tmp,
            )


def pretrained_for(benchmark: BenchmarkSettings, weights: Path, state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the tensors of the converted ``state`` that the benchmark's detector takes, the keys of
    the others); raises naming ``weights`` and the keys when they do not load completely.

    detectron2 matches names by suffix and only logs what it skips, which would load a module
    into a part of another architecture (a 4conv1fc head's fc1 into a 2fc head's fc1, same
    shape) and start a detector from a partly random backbone in silence. So it is handed only
    ``pretrained_modules`` (without an FPN whose norms differ from the detector's: convs trained
    before a norm do not fit an FPN without one, nor the reverse), checked against the keys of
    the detector built here on the CPU by the torchvision backend's rules
    (``loading.detectron2_load_check``)."""
    modules = set(benchmark.pretrained_modules)
    if has_fpn_norm(state, "detectron2") != (benchmark.fpn_norm != "none"):
        modules.discard("fpn")
    kept, left_out = select_modules(state, "detectron2", modules)
    detector = build_model(build_cfg(benchmark, num_classes_of(benchmark)))
    problems, unused = detectron2_load_check(shapes_of(detector.state_dict()), shapes_of(kept))
    check_loadable(weights, problems)
    return {k: v for k, v in kept.items() if k not in unused}, sorted(left_out + unused)


def finetune(
    benchmark: BenchmarkSettings,
    weights: Path | None,
    seed: int,
    out: Path,
    workdir: Path,
    *,
    metrics: Path | None = None,
    num_gpus: int = 0,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    num_workers: int = 2,
) -> None:
    """Train from the converted ``.pkl`` ``weights`` (None: random init) and write ``out``, and
    ``metrics``: detectron2's logged losses and lr (``regioncl.curves``, every 20 iterations).

    ``num_gpus`` per machine (0: one CPU process); with ``num_machines`` > 1 every machine runs
    this with its ``machine_rank`` and a shared ``dist_url`` (tcp://<first host>:<port>).
    Resumes from the last detectron2 checkpoint in ``workdir/<identity key>``.
    """
    identity = finetune_identity(benchmark, seed, weights, RESUME_MAY_CHANGE)
    workdir = Path(workdir) / identity["key"]
    workdir.mkdir(parents=True, exist_ok=True)
    weights_str = str(weights) if weights is not None else ""
    method = "random"
    if weights is not None:
        # Read here, restricted, before detectron2's checkpointer unpickles the same file unrestricted.
        loaded = read_detectron2_weights(weights)
        method = loaded.get("method", "unknown")
        kept, left_out = pretrained_for(benchmark, weights, loaded["model"])
        report_left_out(weights, benchmark.name, left_out, "detectron2")
        if left_out:
            weights_str = str(workdir / "pretrained.d2.pkl")
            write_detectron2_weights(Path(weights_str), {**loaded, "model": kept})
    _check_identity(workdir, identity)
    device = "cuda" if num_gpus > 0 else "cpu"
    launch(
        _train_worker,
        num_gpus_per_machine=max(num_gpus, 1),
        num_machines=num_machines,
        machine_rank=machine_rank,
        dist_url=dist_url,
        # the mask format is read here, once, not by every rank (a COCO training JSON is large)
        args=(
            benchmark.to_dict(), weights_str, method, seed, str(out), str(workdir), device, num_workers,
            mask_format_of(benchmark),
        ),  # fmt: skip
    )
    if metrics is not None and machine_rank == 0:
        publish_detectron2_metrics(workdir / "metrics.json", Path(metrics))


def summary_value(value: float) -> float | None:
    """An AP in percent, or None where the evaluator could not define it (no ground truth in
    that size / frequency group, or no prediction): COCOEvaluator reports those as NaN,
    LVISEvaluator as -100 (lvis' -1, in percent)."""
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def summary_metrics(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """The evaluators' ``{task: {metric: value}}`` without per-class entries."""
    return {
        task: {name: summary_value(value) for name, value in values.items() if name in SUMMARY_METRICS}
        for task, values in results.items()
    }


def evaluate(
    benchmark: BenchmarkSettings,
    model_path: Path,
    out: Path,
    *,
    run: str | None = None,
    method: str | None = None,
    num_gpus: int = 0,
    num_workers: int = 2,
) -> dict:
    """Score a detector finetuned by ``finetune`` on the benchmark's evaluation split (on the GPU
    when ``num_gpus`` > 0, else the CPU) and write the record (``regioncl.transfer.records``)."""
    device = "cuda" if num_gpus > 0 else "cpu"
    saved = load_finetuned_detector(model_path, DETECTRON2_DETECTOR_FORMAT, benchmark)
    workdir = Path(out).parent / f"{Path(out).stem}_detectron2"
    setup_logger(str(workdir), name="detectron2")
    logging.getLogger("detectron2").info("evaluating %s on %s", model_path, benchmark.name)
    register_datasets(benchmark, workdir)
    cfg = build_cfg(benchmark, num_classes_of(benchmark), saved["seed"], str(workdir), "", device, num_workers)
    model = BenchmarkTrainer.build_model(cfg)
    model.load_state_dict(saved["model"])
    model.eval()
    (val_name,) = dataset_names(benchmark)[1]
    evaluator = build_evaluator(benchmark, val_name, workdir)
    # cityscapesscripts writes "matches.json" into the current directory: keep it in workdir
    scratch = contextlib.chdir(workdir) if benchmark.dataset.format == "cityscapes" else contextlib.nullcontext()
    with scratch:
        results = inference_on_dataset(model, build_detection_test_loader(cfg, val_name), evaluator)
    return write_metrics_record(
        out, benchmark, model_path, saved, summary_metrics(results), run=run, method=method,
        versions={"detectron2": detectron2.__version__},
    )
