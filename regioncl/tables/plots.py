"""PNG plots of a paper table's tidy frame (`paper.paper_table_data`), matplotlib's Agg backend.

Each function returns the numbers it drew, so tests (and readers) can check the plot shows the
table's data.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from regioncl.io import atomic_path  # noqa: E402
from regioncl.tables.layout import PaperTable  # noqa: E402
from regioncl.tables.render import metric_label  # noqa: E402

Series = dict[str, list[tuple[int, float]]]


def _save(figure: plt.Figure, out: Path) -> None:
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_ap_vs_epochs(data: pd.DataFrame, benchmark: str, metric: str, out: Path) -> dict[str, Series]:
    """``metric`` on ``benchmark`` against pretraining epochs, one line per method.

    Ours solid (error bars: std over seeds), the paper's dashed. Baselines without pretraining
    sit at 0 epochs. Returns `{"ours": {method: [(epochs, mean), ...]}, "paper": {...}}`, sorted
    by epochs, results that are missing left out.
    """
    cells = data[(data["benchmark"] == benchmark) & (data["metric"] == metric)]
    drawn: dict[str, Series] = {"ours": {}, "paper": {}}
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for method, rows in cells.groupby("method", sort=False):
        rows = rows.assign(x=rows["epochs"].fillna(0).astype(int)).sort_values("x")
        for source, column, style in (("ours", "mean", "-o"), ("paper", "paper", "--s")):
            shown = rows[rows[column].notna()]
            if shown.empty:
                continue
            drawn[source][method] = list(zip(shown["x"].tolist(), shown[column].tolist(), strict=True))
            errors = _error_bars(shown["std"]) if source == "ours" else None
            axes.errorbar(shown["x"], shown[column], yerr=errors, fmt=style, capsize=3, label=f"{method} ({source})")
    axes.set_xlabel("pretraining epochs")
    axes.set_ylabel(f"{metric_label(metric)} (%)")
    axes.set_title(benchmark)
    if drawn["ours"] or drawn["paper"]:
        axes.legend(fontsize="small")
    _save(figure, out)
    return drawn


def plot_benchmark_bars(data: pd.DataFrame, table: PaperTable, out: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """One panel per benchmark of ``table``: its first metric per row, ours beside the paper's.

    Returns `{benchmark: {row label (epochs): (ours mean, paper)}}`; NaN where missing (no bar).
    """
    drawn: dict[str, dict[str, tuple[float, float]]] = {}
    figure, panels = plt.subplots(1, len(table.columns), figsize=(4.5 * len(table.columns), 3.5), squeeze=False)
    for axes, group in zip(panels[0], table.columns, strict=True):
        metric = group.metrics[0]
        cells = data[(data["benchmark"] == group.benchmark) & (data["metric"] == metric)]
        labels = [f"{row} ({_epochs_text(epochs)})" for row, epochs in zip(cells["row"], cells["epochs"], strict=True)]
        drawn[group.benchmark] = {
            label: (float(ours), float(paper))
            for label, ours, paper in zip(labels, cells["mean"], cells["paper"], strict=True)
        }
        x = np.arange(len(labels))
        has_paper = cells["paper"].notna().any()  # no empty "paper" legend entry
        offset = 0.2 if has_paper else 0.0
        axes.bar(x - offset, cells["mean"], width=0.4, yerr=_error_bars(cells["std"]), capsize=3, label="ours")
        if has_paper:
            axes.bar(x + offset, cells["paper"], width=0.4, label="paper")
        axes.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
        axes.set_ylabel(f"{metric_label(metric)} (%)")
        axes.set_title(f"{group.benchmark} {group.label}".strip())
        axes.legend(fontsize="small")
    _save(figure, out)
    return drawn


def _error_bars(std: pd.Series) -> np.ndarray | None:
    """Std over seeds as error bars; None where no cell has two seeds (NaN std): no ±0 bars."""
    return None if std.isna().all() else std.to_numpy(dtype=float)


def _epochs_text(epochs: object) -> str:
    return "no pretraining" if pd.isna(epochs) else f"{epochs} ep"
