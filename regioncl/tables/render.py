"""A paper table's tidy frame (`paper.paper_table_data`) as Markdown, LaTeX (booktabs), CSV, HTML.

Shown tables keep the paper's columns and give each of our rows three lines: `ours`
(mean ± std over seeds), `paper` (the printed number) and `Δ` (ours - paper). A table with a
`baseline` adds the difference to the baseline row to each of our cells: `16.0 ± 1.1 (+5.0)`.
A cell with no result yet, or a number the paper does not print, is shown as `—`, never dropped.
"""

from __future__ import annotations

import html
import re

import pandas as pd

from regioncl.tables.layout import PaperTable
from regioncl.tables.summary import format_mean_std

MISSING = "—"
LINES = ("ours", "paper", "Δ")
IOU_TYPE_MARKS = {"bbox": "bb", "segm": "mk"}


def metric_label(metric: str, latex: bool = False) -> str:
    """`bbox.AP50` -> "AP^bb_50" (LaTeX: "AP$^{\\mathrm{bb}}_{50}$"); `sem_seg.mIoU` -> "mIoU"."""
    iou_type, _, name = metric.partition(".")
    ap = re.fullmatch(r"AP(\d+|[sml])?", name)
    if ap is None or iou_type not in IOU_TYPE_MARKS:
        return name
    mark, sub = IOU_TYPE_MARKS[iou_type], ap.group(1)
    if latex:
        return f"AP$^{{\\mathrm{{{mark}}}}}" + (f"_{{{sub}}}$" if sub else "$")
    return f"AP^{mark}" + (f"_{sub}" if sub else "")


def _number(value: float, signed: bool = False) -> str:
    if pd.isna(value):
        return MISSING
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _epochs(value: object) -> str:
    return "-" if pd.isna(value) else str(value)


def label_headers(table: PaperTable) -> tuple[str, ...]:
    """Method, epochs and, for tables with a reference, the line (`ours`, `paper`, `Δ`)."""
    return ("Method", "Epochs", "") if table.reference else ("Method", "Epochs")


def shown_rows(table: PaperTable, data: pd.DataFrame) -> list[tuple[str, ...]]:
    """Body cells: per table row, its `ours`, `paper` and `Δ` lines (labels, then one cell per metric).

    A table without a reference shows the `ours` line alone, without the line column.
    """
    per_row = sum(len(group.metrics) for group in table.columns)
    rows = []
    # Consecutive blocks, not groupby("row"): two rows may share a label (SoCo 100 and 400 ep).
    for start in range(0, len(data), per_row):
        cells = data.iloc[start : start + per_row]
        row_label = cells["row"].iloc[0]
        epochs = _epochs(cells["epochs"].iloc[0])
        ours = [format_mean_std(m, s, n) for m, s, n in zip(cells["mean"], cells["std"], cells["seeds"], strict=True)]
        ours = [
            cell if pd.isna(versus) else f"{cell} ({_number(versus, signed=True)})"
            for cell, versus in zip(ours, cells["vs_baseline"], strict=True)
        ]
        if not table.reference:
            rows.append((row_label, epochs, *ours))
            continue
        rows.append((row_label, epochs, "ours", *ours))
        rows.append(("", "", "paper", *(_number(v) for v in cells["paper"])))
        rows.append(("", "", "Δ", *(_number(v, signed=True) for v in cells["delta"])))
    return rows


def _metric_headers(table: PaperTable, latex: bool = False) -> list[str]:
    return [metric_label(metric, latex) for group in table.columns for metric in group.metrics]


def _group_headers(table: PaperTable) -> list[str]:
    """One flat header per metric: "<group label> <metric>" (the paper's `1× AP^bb`)."""
    return [
        f"{group.label} {metric_label(metric)}".strip() for group in table.columns for metric in group.metrics
    ]


def to_markdown(table: PaperTable, data: pd.DataFrame) -> str:
    shown = pd.DataFrame(shown_rows(table, data), columns=[*label_headers(table), *_group_headers(table)])
    return f"{table.caption}\n\n" + shown.to_markdown(index=False, disable_numparse=True) + "\n"


def to_csv(data: pd.DataFrame) -> str:
    """The tidy frame itself: one line per (row, benchmark, metric); empty = missing."""
    return data.to_csv(index=False, float_format="%.4f")


def to_html(table_id: str, table: PaperTable, data: pd.DataFrame) -> str:
    """A standalone page (for `snakemake --report`) with the caption and the table."""
    columns = pd.MultiIndex.from_tuples(
        [(label, "") for label in label_headers(table)]
        + [(group.label, metric_label(metric)) for group in table.columns for metric in group.metrics]
    )
    shown = pd.DataFrame(shown_rows(table, data), columns=columns)
    body = shown.to_html(index=False, na_rep=MISSING, border=0)
    return (
        f'<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>{html.escape(table_id)}</title></head>\n'
        f"<body>\n<p>{html.escape(table.caption)}</p>\n{body}\n</body>\n</html>\n"
    )


LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "×": r"$\times$", "±": r"$\pm$", "Δ": r"$\Delta$",
    "—": "---",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in text)


def to_latex(table_id: str, table: PaperTable, data: pd.DataFrame) -> str:
    """A booktabs `table` environment: group headers over their metrics, three lines per row."""
    n_labels = len(label_headers(table))
    lines_per_row = len(LINES) if table.reference else 1
    widths = [len(group.metrics) for group in table.columns]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{latex_escape(table.caption)}}}",
        f"\\label{{tab:{table_id}}}",
        f"\\begin{{tabular}}{{{'l' * n_labels}{'r' * sum(widths)}}}",
        r"\toprule",
    ]
    if any(group.label for group in table.columns):
        spans = [
            f"\\multicolumn{{{w}}}{{c}}{{{latex_escape(g.label)}}}"
            for g, w in zip(table.columns, widths, strict=True)
        ]
        lines.append(" & " * n_labels + " & ".join(spans) + r" \\")
        starts = [n_labels + 1 + sum(widths[:i]) for i in range(len(widths))]
        lines.append(" ".join(f"\\cmidrule(lr){{{s}-{s + w - 1}}}" for s, w in zip(starts, widths, strict=True)))
    lines.append(" & ".join([*label_headers(table), *_metric_headers(table, latex=True)]) + r" \\")
    lines.append(r"\midrule")
    body = shown_rows(table, data)
    for i, cells in enumerate(body):
        if i and lines_per_row > 1 and i % lines_per_row == 0:
            lines.append(r"\addlinespace")
        lines.append(" & ".join(latex_escape(cell) for cell in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
