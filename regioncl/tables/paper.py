"""Paper-style tables: our runs laid out like a paper's table, the paper's numbers beside them.

A tables config (`config/tables/*.yaml`) names, per table, its rows (our method and pretraining
epochs, and the printed row of the reference table they reproduce), its columns (metrics per
benchmark) and the reference table (`config/reference/<paper>.yaml`, key `<paper>.<table>`).
`paper_table_data` joins the evaluator's metrics (mean and sample std over seeds) with the
reference numbers into one tidy frame; `render` and `plots` turn that frame into files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from regioncl.io import write_text_atomic
from regioncl.tables.layout import PaperTable, load_tables_config
from regioncl.tables.metrics import load_metric_values
from regioncl.tables.plots import plot_ap_vs_epochs, plot_benchmark_bars
from regioncl.tables.reference import ReferenceTable, load_references
from regioncl.tables.render import to_csv, to_html, to_latex, to_markdown

TIDY_COLUMNS = [
    "row", "method", "epochs", "run", "benchmark", "metric", "seeds", "mean", "std", "paper", "delta", "vs_baseline",
]


def output_paths(table_id: str, tables_dir: str | Path, plots_dir: str | Path) -> dict[str, Path]:
    """The files `write_paper_tables` writes for one table, by kind."""
    tables, plots = Path(tables_dir), Path(plots_dir)
    return {
        **{ext: tables / f"{table_id}.{ext}" for ext in ("md", "tex", "csv", "html")},
        "epochs_png": plots / f"{table_id}_epochs.png",
        "bars_png": plots / f"{table_id}_bars.png",
    }


def table_outputs(table_ids: Sequence[str], tables_dir: str, plots_dir: str) -> list[str]:
    """Every file `write_paper_tables` writes for these tables (the Snakefile's outputs)."""
    return [str(path) for table_id in table_ids for path in output_paths(table_id, tables_dir, plots_dir).values()]


def paper_table_data(
    table: PaperTable, values: pd.DataFrame, reference: ReferenceTable | None, where: str
) -> pd.DataFrame:
    """Tidy frame, one line per (row, benchmark, metric), in table order (columns `TIDY_COLUMNS`).

    `values`: `load_metric_values`' long frame. `mean`/`std` are over seeds (sample std, NaN
    for one seed); `seeds` counts them (0: no result yet, mean NaN). `paper` is the reference
    number (NaN: not printed), `delta` = mean - paper. `vs_baseline` = mean - the mean of the
    table's baseline row for the same metric (NaN without a baseline, on the baseline's own
    row, or while either has no result).
    """
    if reference is None and any(row.reference for row in table.rows):
        raise ValueError(f"{where}: rows name reference rows but the table names no `reference`")
    stats = values.groupby(["run", "benchmark", "metric"])["value"].agg(["mean", "std", "count"])
    lines = []
    for i, row in enumerate(table.rows):
        run = table.run_of(row)
        printed = reference.row(row.reference, row.epochs, f"{where}.rows[{i}]") if row.reference else None
        for group in table.columns:
            for metric in group.metrics:
                key = (run, group.benchmark + row.benchmark_suffix, metric)
                found = key in stats.index
                paper = reference.value(printed, group.benchmark, metric) if printed else None
                mean = stats.at[key, "mean"] if found else float("nan")
                lines.append(
                    {
                        "row": table.label_of(row),
                        "method": row.method,
                        "epochs": row.epochs,
                        "run": run,
                        "benchmark": group.benchmark,
                        "metric": metric,
                        "seeds": int(stats.at[key, "count"]) if found else 0,
                        "mean": mean,
                        "std": stats.at[key, "std"] if found else float("nan"),
                        "paper": float("nan") if paper is None else paper,
                        "delta": mean - paper if paper is not None else float("nan"),
                    }
                )
    data = pd.DataFrame(lines, columns=[c for c in TIDY_COLUMNS if c != "vs_baseline"])
    data["vs_baseline"] = _versus_baseline(data, table.baseline)
    data["epochs"] = data["epochs"].astype("Int64")
    return data


def _versus_baseline(data: pd.DataFrame, baseline: str | None) -> pd.Series:
    if baseline is None:
        return pd.Series(float("nan"), index=data.index)
    # The first row of the baseline method is the reference point (a table lists it once).
    base = data[data["method"] == baseline].drop_duplicates(["benchmark", "metric"]).set_index(["benchmark", "metric"])
    base_mean = [base.at[(b, m), "mean"] for b, m in zip(data["benchmark"], data["metric"], strict=True)]
    versus = data["mean"] - pd.Series(base_mean, index=data.index)
    return versus.where(data["method"] != baseline)


def write_paper_tables(
    metrics_paths: Sequence[Path], tables_config: Path, reference_dir: Path, tables_dir: Path, plots_dir: Path
) -> list[Path]:
    """Each table of ``tables_config`` as Markdown, LaTeX, CSV, HTML and two plots; returns the files."""
    tables = load_tables_config(tables_config)
    references = load_references(reference_dir)
    values = load_metric_values(metrics_paths)
    written = []
    for table_id, table in tables.items():
        where = f"{tables_config}: tables.{table_id}"
        if table.reference is not None and table.reference not in references:
            raise ValueError(f"{where}.reference: {table.reference!r} is not in {reference_dir} ({sorted(references)})")
        reference = references[table.reference] if table.reference else None
        data = paper_table_data(table, values, reference, where)
        paths = output_paths(table_id, tables_dir, plots_dir)
        write_text_atomic(paths["md"], to_markdown(table, data))
        write_text_atomic(paths["tex"], to_latex(table_id, table, data))
        write_text_atomic(paths["csv"], to_csv(data))
        write_text_atomic(paths["html"], to_html(table_id, table, data))
        headline = table.columns[0]
        plot_ap_vs_epochs(data, headline.benchmark, headline.metrics[0], paths["epochs_png"])
        plot_benchmark_bars(data, table, paths["bars_png"])
        written += paths.values()
    return written
