"""The summary table: one row per (method, run, benchmark), AP columns as mean ± std over seeds.

Input: the evaluator's metrics JSON files (`regioncl evaluate`), each with `method`, `run`,
`benchmark`, `seed` and `metrics: {iou_type: {AP, AP50, AP75, ...}}` in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from regioncl.io import write_text_atomic
from regioncl.tables.metrics import read_metrics_records

METRICS = ("AP", "AP50", "AP75")
IOU_TYPE_LABELS = {"bbox": "box", "segm": "mask"}


def load_metrics(paths: Sequence[Path]) -> pd.DataFrame:
    """Long table: one row per (file, iou_type) with the AP columns."""
    rows = []
    for path, record in read_metrics_records(paths):
        for iou_type, values in record["metrics"].items():
            absent = [m for m in METRICS if m not in values]
            if absent:
                raise ValueError(f"{path}: metrics.{iou_type} lacks {absent}; expected {list(METRICS)}")
            rows.append(
                {
                    "method": record["method"],
                    "run": record["run"],
                    "benchmark": record["benchmark"],
                    "seed": int(record["seed"]),
                    "iou_type": iou_type,
                    **{m: float(values[m]) for m in METRICS},
                }
            )
    return pd.DataFrame(rows)


def summarize(long: pd.DataFrame) -> pd.DataFrame:
    """Wide table: index (method, run, benchmark); columns `<box|mask> <metric> mean|std`, `seeds`.

    Baselines without pretraining (`random`) come first, then runs in name order.
    """
    grouped = long.groupby(["method", "run", "benchmark", "iou_type"])[list(METRICS)]
    stats = grouped.agg(["mean", "std"])
    seeds = long.groupby(["method", "run", "benchmark"])["seed"].nunique().rename("seeds")
    wide = stats.unstack("iou_type")
    wide.columns = [
        f"{IOU_TYPE_LABELS.get(iou_type, iou_type)} {metric} {stat}" for metric, stat, iou_type in wide.columns
    ]
    ordered = sorted(wide.columns, key=_column_order)
    table = wide[ordered].join(seeds).reset_index()
    table["is_baseline"] = table["method"] == "random"
    table = table.sort_values(["benchmark", "is_baseline", "run"], ascending=[True, False, True])
    return table.drop(columns="is_baseline").reset_index(drop=True)


def _column_order(column: str) -> tuple[int, int, int]:
    kind, metric, stat = column.split(" ")
    return (list(IOU_TYPE_LABELS.values()).index(kind), METRICS.index(metric), ("mean", "std").index(stat))


def to_markdown(table: pd.DataFrame) -> str:
    """`mean ± std` cells (std only with more than one seed), one decimal like the papers."""
    shown = table[["method", "run", "benchmark", "seeds"]].copy()
    means = [c for c in table.columns if c.endswith(" mean")]
    for mean_column in means:
        label = mean_column.removesuffix(" mean")
        std_column = f"{label} std"
        shown[label] = [
            format_mean_std(mean, std, seeds)
            for mean, std, seeds in zip(table[mean_column], table[std_column], table["seeds"], strict=True)
        ]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def format_mean_std(mean: float, std: float, seeds: int) -> str:
    """`mean ± std` with one decimal; the mean alone for one seed; `—` for no result."""
    if pd.isna(mean):
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 and not pd.isna(std) else f"{mean:.1f}"


def write_summary(metrics_paths: Sequence[Path], markdown: Path, csv: Path) -> pd.DataFrame:
    table = summarize(load_metrics(metrics_paths))
    write_text_atomic(markdown, to_markdown(table))
    write_text_atomic(csv, table.to_csv(index=False, float_format="%.4f"))
    return table
