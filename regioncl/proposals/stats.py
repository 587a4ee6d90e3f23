"""Summary of a dataset's proposal chunks: boxes per image, fallback rules, bad files, throughput.

Per-image numbers come from the chunk parquets (what training will see); bad files, timings and
candidate counts from the chunk reports (what the jobs did). Both must describe the same chunks:
the good-image counts and the settings are checked against each other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from regioncl.data.proposals_file import read_proposal_settings
from regioncl.io import write_json_atomic
from regioncl.proposals.filters import RULES

STATS_FORMAT = "regioncl.proposal_stats/1"
_SECONDS_PER_HOUR = 3600.0


def _boxes_and_rules(parquet: Path) -> tuple[np.ndarray, list[str]]:
    """(N,) int64 kept boxes per image and the N filter rules of a chunk parquet, without
    materialising the boxes themselves."""
    table = pq.read_table(parquet, columns=["boxes", "rule"])
    coordinates = pc.list_value_length(table.column("boxes")).to_numpy(zero_copy_only=False)
    return coordinates.astype(np.int64) // 4, table.column("rule").to_pylist()


def _load_report(path: Path) -> dict[str, Any]:
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    needed = ("chunk", "num_chunks", "images", "good", "bad", "bad_files", "seconds", "processes", "settings")
    missing = [name for name in needed if name not in report]
    if missing:
        raise ValueError(f"{path}: not a proposals chunk report (missing {', '.join(missing)}); re-run the chunk")
    return report


def proposal_stats(reports: Sequence[Path], proposals: Sequence[Path], out: Path) -> dict[str, Any]:
    """Summarise the chunks whose reports and parquets are given; write the summary to ``out``
    (JSON, atomically), print a short one to stderr, and return it.

    Throughput: ``images_per_second_per_process`` is all listed images over the summed
    ``seconds x processes`` of the chunk jobs (bad files count: they cost a read each), and
    ``core_hours_per_million_images`` extrapolates it to ImageNet scale.
    """
    if not reports or not proposals:
        raise ValueError("proposal_stats needs at least one chunk report and one proposals parquet")
    loaded = [_load_report(path) for path in reports]
    settings = read_proposal_settings(proposals[0])
    for path in proposals[1:]:
        if read_proposal_settings(path) != settings:
            raise ValueError(f"{path} was made with other proposal settings than {proposals[0]}; summarise one run")
    for path, report in zip(reports, loaded):
        if report["settings"] != settings:
            raise ValueError(f"{path} reports other proposal settings than {proposals[0]} was made with")

    counts, rules = [], []
    for path in proposals:
        chunk_counts, chunk_rules = _boxes_and_rules(path)
        counts.append(chunk_counts)
        rules += chunk_rules
    per_image = np.concatenate(counts)
    good = sum(report["good"] for report in loaded)
    if good != len(per_image):
        raise ValueError(
            f"the reports count {good} good images but the parquets hold {len(per_image)}; "
            f"pass the report and parquet of the same chunks"
        )

    images = sum(report["images"] for report in loaded)
    seconds = sum(report["seconds"] for report in loaded)
    process_seconds = sum(report["seconds"] * report["processes"] for report in loaded)
    per_process = images / process_seconds if process_seconds > 0 else float("nan")
    candidates = sum(report.get("mean_candidates", 0.0) * report["good"] for report in loaded)
    stats = {
        "format": STATS_FORMAT,
        "chunks": sorted(int(report["chunk"]) for report in loaded),
        "images": images,
        "good": good,
        "bad": sum(report["bad"] for report in loaded),
        "bad_files": [
            {**item, "chunk": int(report["chunk"])} for report in loaded for item in report["bad_files"]
        ],
        "proposals_per_image": {
            "mean": float(per_image.mean()),
            "median": float(np.median(per_image)),
            "min": int(per_image.min()),
            "max": int(per_image.max()),
        },
        "candidates_per_image_mean": candidates / good,
        "rules": {rule: rules.count(rule) for rule in RULES},
        "throughput": {
            "seconds": seconds,
            "process_seconds": process_seconds,
            "images_per_second": images / seconds if seconds > 0 else float("nan"),
            "images_per_second_per_process": per_process,
            "core_hours_per_million_images": 1e6 / per_process / _SECONDS_PER_HOUR,
        },
        "settings": settings,
    }
    write_json_atomic(out, stats)
    print(summary_text(stats), file=sys.stderr)
    return stats


def summary_text(stats: dict[str, Any]) -> str:
    """A few human-readable lines of a ``proposal_stats`` result."""
    boxes = stats["proposals_per_image"]
    speed = stats["throughput"]
    fallbacks = ", ".join(f"{rule} {count}" for rule, count in stats["rules"].items())
    lines = [
        f"{len(stats['chunks'])} chunk(s): {stats['images']} images, {stats['good']} good, {stats['bad']} bad",
        f"proposals per image: mean {boxes['mean']:.1f}, median {boxes['median']:.0f}, "
        f"min {boxes['min']}, max {boxes['max']} (from {stats['candidates_per_image_mean']:.1f} candidates)",
        f"rules: {fallbacks}",
        f"throughput: {speed['images_per_second']:.2f} images/s per job, "
        f"{speed['images_per_second_per_process']:.2f} per process "
        f"({speed['core_hours_per_million_images']:.1f} core-hours per million images)",
    ]
    lines += [f"bad: {item['path']}: {item['reason']}" for item in stats["bad_files"][:10]]
    if stats["bad"] > 10:
        lines.append(f"... and {stats['bad'] - 10} more bad files (see the JSON)")
    return "\n".join(lines)
