"""Reading the evaluator's metrics JSON files (`regioncl evaluate`) into pandas.

A file holds `method`, `run`, `benchmark`, `seed` and `metrics: {kind: {name: value}}`
with values in percent (e.g. `{"bbox": {"AP": 40.1, "AP50": 60.2}, "segm": {...}}`; the
representation probe, `regioncl probe`, writes `{"probe": {"accuracy": 71.3}}`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

LABELS = ("method", "run", "benchmark", "seed")  # what a record's numbers are of
REQUIRED_FIELDS = (*LABELS, "metrics")


def read_metrics_records(paths: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(path, record) per file, each checked for the fields every table needs."""
    if not paths:
        raise ValueError("no metrics given: expected at least one metrics.json")
    records = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        missing = [field for field in REQUIRED_FIELDS if field not in record]
        if missing:
            raise ValueError(f"{path}: metrics file lacks field(s) {missing}; expected {list(REQUIRED_FIELDS)}")
        records.append((Path(path), record))
    return records


def labels_of(record: dict[str, Any]) -> dict[str, Any]:
    """A record's ``LABELS``, typed (the seed as an int)."""
    return {**{name: record[name] for name in LABELS}, "seed": int(record["seed"])}


def load_metric_values(paths: Sequence[Path]) -> pd.DataFrame:
    """Long table, one row per (file, metric): method, run, benchmark, seed, metric, value.

    `metric` is `<iou_type>.<name>` (e.g. `bbox.AP50`, `segm.AP`); values in percent. A metric
    the evaluator left undefined (null: e.g. APl on a split without large objects) has no row,
    so its cell shows as missing.
    """
    rows = [
        {**labels_of(record), "metric": f"{iou_type}.{name}", "value": float(value)}
        for _, record in read_metrics_records(paths)
        for iou_type, values in record["metrics"].items()
        for name, value in values.items()
        if value is not None
    ]
    return pd.DataFrame(rows, columns=[*LABELS, "metric", "value"])
