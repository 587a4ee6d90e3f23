"""The summary table: one row per (method, run, benchmark), metric columns as mean ± std over seeds.

Input: metrics records (`regioncl.tables.metrics`). The evaluator's (`regioncl evaluate`) kinds are
`bbox` and `segm`, of which the table shows AP, AP50 and AP75; any other kind (the probe's
`probe.accuracy`, `regioncl probe`) adds all its values as columns after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from regioncl.baselines import BASELINES
from regioncl.io import write_text_atomic
from regioncl.tables.metrics import LABELS, labels_of, read_metrics_records

METRICS = ("AP", "AP50", "AP75")
IOU_TYPE_LABELS = {"bbox": "box", "segm": "mask"}


def load_metrics(paths: Sequence[Path]) -> pd.DataFrame:
    """Long table: one row per (file, shown metric): method, run, benchmark, seed, column, value.

    `column` is the metric's column label: `box AP50`, `mask AP`, `probe accuracy`.
    """
    rows = []
    for path, record in read_metrics_records(paths):
        for kind, values in record["metrics"].items():
            if kind in IOU_TYPE_LABELS:
                absent = [m for m in METRICS if m not in values]
                if absent:
                    raise ValueError(f"{path}: metrics.{kind} lacks {absent}; expected {list(METRICS)}")
                shown = {m: values[m] for m in METRICS}
            else:
                shown = {name: value for name, value in values.items() if value is not None}
            rows += [
                {**labels_of(record), "column": f"{IOU_TYPE_LABELS.get(kind, kind)} {name}", "value": float(value)}
                for name, value in shown.items()
            ]
    return pd.DataFrame(rows, columns=[*LABELS, "column", "value"])


def summarize(long: pd.DataFrame) -> pd.DataFrame:
    """Wide table: index (method, run, benchmark); columns `<column> mean|std` (e.g. `box AP
    mean`), `seeds` (how many seeds the row's records have).

    Box, then mask columns (AP, AP50, AP75), then other kinds' in name order. Baselines without
    self-supervised pretraining (`random`, `supervised`) come first, then runs in name order.
    """
    stats = long.groupby(["method", "run", "benchmark", "column"])["value"].agg(["mean", "std"])
    seeds = long.groupby(["method", "run", "benchmark"])["seed"].nunique().rename("seeds")
    wide = stats.unstack("column")
    wide.columns = [f"{column} {stat}" for stat, column in wide.columns]
    ordered = sorted(wide.columns, key=_column_order)
    table = wide[ordered].join(seeds).reset_index()
    table["is_baseline"] = table["method"].isin(BASELINES)
    table = table.sort_values(["benchmark", "is_baseline", "run"], ascending=[True, False, True])
    return table.drop(columns="is_baseline").reset_index(drop=True)


def _column_order(column: str) -> tuple[int, int | str, int]:
    kind, metric, stat = column.split(" ")
    stat_order = ("mean", "std").index(stat)
    labels = list(IOU_TYPE_LABELS.values())
    if kind in labels:
        return (labels.index(kind), METRICS.index(metric), stat_order)
    return (len(labels), f"{kind} {metric}", stat_order)


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
