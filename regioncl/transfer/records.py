"""What the transfer stages hand on: the finetuned detector file, checked before it is
evaluated, and the metrics record the tables read (``regioncl.tables.metrics``), written here
alone: the same for both backends and for the probe (``regioncl.probe``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import regioncl
from regioncl.io import write_json_atomic
from regioncl.transfer.benchmarks import BenchmarkSettings


def write_record(
    out: Path,
    *,
    benchmark: str,
    run: str | None,
    method: str,
    seed: int,
    weights: str,
    metrics: Mapping[str, Mapping[str, float | None]],
    versions: Mapping[str, str],
    **details: Any,
) -> dict:
    """Write and return a metrics record, the one format every stage that scores weights writes
    (the finetuned detectors' evaluation, the probe): the labels of its table row (benchmark,
    run, method, seed), the weights scored, the stage's own ``details``, ``metrics`` as
    ``{kind: {name: value}}`` in percent (None: undefined), and the versions that made them
    (``versions``: the stage's own, beside torch and regioncl)."""
    record = {
        "benchmark": benchmark,
        "run": run,
        "method": method,
        "seed": seed,
        "weights": weights,
        **details,
        "metrics": metrics,
        "versions": {"torch": torch.__version__, **versions, "regioncl": regioncl.__version__},
    }
    write_json_atomic(out, record)
    return record


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
    """``write_record`` for a finetuned detector, the same for both backends: the benchmark,
    labels (``method`` defaults to the weights' method), the ``saved`` detector's path, seed and
    weights, and the backend's ``versions`` beside pycocotools'."""
    return write_record(
        out,
        benchmark=benchmark.name,
        run=run,
        method=method or saved["method"],
        seed=saved["seed"],
        weights=saved["weights"],
        model=str(model_path),
        metrics=metrics,
        versions={**versions, "pycocotools": importlib.metadata.version("pycocotools")},
    )


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
