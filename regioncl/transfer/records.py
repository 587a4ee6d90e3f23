"""What the transfer stages hand on: the finetuned detector file, checked before it is
evaluated, and the metrics record the tables read (``regioncl.tables.metrics``), the same for
both backends.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

import regioncl
from regioncl.io import write_json_atomic
from regioncl.transfer.benchmarks import BenchmarkSettings


def write_metrics_record(
    out: Path,
    benchmark: BenchmarkSettings,
    model_path: Path,
    saved: dict,
    metrics: dict[str, dict[str, float | None]],
    *,
    run: str | None,
    method: str | None,
    versions: dict[str, str],
) -> dict:
    """Write and return the metrics record both backends produce (what the tables read): the
    benchmark, labels (``method`` defaults to the weights' method), the finetuned ``saved``
    detector's seed and weights, ``metrics`` in percent, and the versions that made them
    (``versions``: the backend's own, beside torch, pycocotools and regioncl)."""
    record = {
        "benchmark": benchmark.name,
        "run": run,
        "method": method or saved["method"],
        "model": str(model_path),
        "seed": saved["seed"],
        "weights": saved["weights"],
        "metrics": metrics,
        "versions": {
            "torch": torch.__version__,
            **versions,
            "pycocotools": importlib.metadata.version("pycocotools"),
            "regioncl": regioncl.__version__,
        },
    }
    write_json_atomic(out, record)
    return record


def load_finetuned_detector(model_path: Path, detector_format: str, benchmark: BenchmarkSettings) -> dict:
    """A finetuned detector file of either backend, checked to be ``detector_format`` and to
    have been finetuned on ``benchmark`` (evaluating it on another would score the wrong task)."""
    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != detector_format:
        raise ValueError(f"{model_path}: expected format {detector_format!r}")
    if saved["benchmark"] != benchmark.name:
        raise ValueError(
            f"{model_path}: finetuned on benchmark {saved['benchmark']!r}, evaluating {benchmark.name!r}"
        )
    return saved
