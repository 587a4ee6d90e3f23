"""Paper-style tables: golden Markdown/CSV/LaTeX, the joined numbers, plots, config errors."""

import struct
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from regioncl.tables.layout import load_tables_config
from regioncl.tables.metrics import load_metric_values
from regioncl.tables.paper import (
    paper_table_data,
    table_outputs,
    write_paper_tables,
)
from regioncl.tables import plots
from regioncl.tables.plots import plot_ap_vs_epochs, plot_benchmark_bars
from regioncl.tables.reference import load_references
from regioncl.tables.render import metric_label

FIXTURES = Path(__file__).parent / "fixtures" / "tables"
METRICS = sorted((FIXTURES / "metrics").glob("*.json"))
TABLES = FIXTURES / "paper_tables.yaml"
REFERENCE_DIR = FIXTURES / "reference"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    paths = write_paper_tables(METRICS, TABLES, REFERENCE_DIR, out / "tables", out / "plots")
    return out, paths


@pytest.fixture(scope="module")
def demo_data():
    table = load_tables_config(TABLES)["demo"]
    reference = load_references(REFERENCE_DIR)["demo.table1"]
    return table, paper_table_data(table, load_metric_values(METRICS), reference, "test")


@pytest.mark.parametrize(
    "name", ["demo.md", "demo.csv", "demo.tex", "plain.md", "plain.csv", "plain.tex", "versus.md", "versus.csv", "versus.tex"]
)
def test_rendered_tables_match_golden_files(written, name):
    out, _ = written
    assert (out / "tables" / name).read_text() == (FIXTURES / f"expected_{name}").read_text()


def test_written_files_are_exactly_the_declared_outputs(written):
    out, paths = written
    declared = table_outputs(["demo", "plain", "versus"], str(out / "tables"), str(out / "plots"))
    assert sorted(map(str, paths)) == sorted(declared)
    assert all(Path(path).is_file() for path in declared)


def test_joined_numbers_are_mean_sample_std_paper_and_difference(demo_data):
    _, data = demo_data
    moco_ap = data[(data["run"] == "moco_v2_r18_20ep") & (data["metric"] == "bbox.AP")].iloc[0]
    assert moco_ap["mean"] == pytest.approx((15.25 + 16.75) / 2)
    assert moco_ap["std"] == pytest.approx(1.5 / 2**0.5)
    assert moco_ap["seeds"] == 2
    assert moco_ap["paper"] == 15.0
    assert moco_ap["delta"] == pytest.approx(16.0 - 15.0)


def test_missing_results_and_unprinted_numbers_are_kept_as_missing_rows(demo_data):
    table, data = demo_data
    # Every (row, metric) cell is present, results or not: 3 rows x 3 metrics.
    assert len(data) == len(table.rows) * sum(len(group.metrics) for group in table.columns)
    soco = data[data["method"] == "soco"]
    assert (soco["seeds"] == 0).all() and soco["mean"].isna().all() and soco["delta"].isna().all()
    assert list(soco["paper"]) == [17.0, 33.0, 37.6]
    moco_ap50 = data[(data["method"] == "moco_v2") & (data["metric"] == "bbox.AP50")].iloc[0]
    assert pd.isna(moco_ap50["paper"]) and pd.isna(moco_ap50["delta"])


def test_html_is_a_standalone_page_with_caption_and_missing_marks(written):
    out, _ = written
    page = (out / "tables" / "demo.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Demo &amp; test" in page
    assert page.count("<tr") == 2 + 9  # two header lines, three lines for each of three rows
    assert "—" in page and "16.0 ± 1.1" in page


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_plots_are_pngs_of_sensible_size(written):
    out, _ = written
    for name in ("demo_epochs.png", "demo_bars.png", "plain_epochs.png", "plain_bars.png"):
        width, height = _png_size(out / "plots" / name)
        assert 200 <= width <= 3000 and 150 <= height <= 2000, (name, width, height)


def test_epoch_plot_draws_the_tables_means_and_paper_numbers(demo_data, tmp_path):
    _, data = demo_data
    drawn = plot_ap_vs_epochs(data, "embedded_frcnn_r18fpn", "bbox.AP", tmp_path / "epochs.png")
    assert drawn["ours"] == {"random": [(0, 11.0)], "moco_v2": [(20, 16.0)]}
    assert drawn["paper"] == {"random": [(0, 10.5)], "moco_v2": [(20, 15.0)], "soco": [(100, 17.0)]}


def test_bar_plot_draws_each_benchmarks_headline_metric(demo_data, tmp_path):
    table, data = demo_data
    drawn = plot_benchmark_bars(data, table, tmp_path / "bars.png")
    assert list(drawn) == ["embedded_frcnn_r18fpn", "coco_mask_rcnn_r50fpn_1x"]
    embedded = drawn["embedded_frcnn_r18fpn"]
    assert embedded["Scratch (no pretraining)"] == (11.0, 10.5)
    assert embedded["MoCo v2 [5] (20 ep)"] == (16.0, 15.0)
    ours, paper = drawn["coco_mask_rcnn_r50fpn_1x"]["SoCo (100 ep)"]
    assert pd.isna(ours) and paper == 37.6


def test_bar_plot_without_paper_numbers_or_repeated_seeds_has_no_empty_legend_or_zero_error_bars(
    demo_data, tmp_path, monkeypatch
):
    table, data = demo_data
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to inspect it
    one_seed_no_paper = data.assign(paper=float("nan"), std=float("nan"), seeds=1)
    plot_benchmark_bars(one_seed_no_paper, table, tmp_path / "bars.png")
    for axes in figures[0].axes:
        assert axes.get_legend_handles_labels()[1] == ["ours"]
        assert not any(isinstance(container, ErrorbarContainer) for container in axes.containers)
    figures.clear()
    plot_benchmark_bars(data.assign(std=2.0), table, tmp_path / "bars.png")
    assert figures[0].axes[0].get_legend_handles_labels()[1] == ["ours", "paper"]
    assert any(isinstance(container, ErrorbarContainer) for container in figures[0].axes[0].containers)


@pytest.mark.parametrize(
    ("metric", "text", "latex"),
    [("bbox.AP", "AP^bb", "AP$^{\\mathrm{bb}}$"), ("segm.AP75", "AP^mk_75", "AP$^{\\mathrm{mk}}_{75}$"),
     ("sem_seg.mIoU", "mIoU", "mIoU")],
)
def test_metric_labels_follow_the_papers_notation(metric, text, latex):
    assert metric_label(metric) == text
    assert metric_label(metric, latex=True) == latex


def test_reference_row_at_other_epochs_is_an_error_naming_the_row(tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text(
        "tables:\n  t:\n    caption: c\n    reference: demo.table1\n"
        "    columns: [{benchmark: embedded_frcnn_r18fpn, metrics: [bbox.AP]}]\n"
        "    rows: [{method: soco, epochs: 400, reference: SoCo}]\n"
    )
    with pytest.raises(ValueError, match=r"tables\.t\.rows\[0\].*'SoCo' at 400 epochs"):
        write_paper_tables(METRICS, config, REFERENCE_DIR, tmp_path / "t", tmp_path / "p")


def test_unknown_reference_table_is_an_error_listing_the_known_ones(tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text(
        "tables:\n  t:\n    caption: c\n    reference: demo.table9\n"
        "    columns: [{benchmark: b, metrics: [bbox.AP]}]\n    rows: [{method: random}]\n"
    )
    with pytest.raises(ValueError, match=r"tables\.t\.reference.*demo\.table9.*demo\.table1"):
        write_paper_tables(METRICS, config, REFERENCE_DIR, tmp_path / "t", tmp_path / "p")


def test_unknown_key_in_a_tables_config_is_an_error_naming_it(tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text("tables:\n  t:\n    caption: c\n    colums: []\n    rows: []\n")
    with pytest.raises(ValueError, match=r"tables\.t.*colums"):
        load_tables_config(config)


@pytest.mark.parametrize("name", ["paper.yaml", "embedded.yaml", "embedded_benchmark.yaml"])
def test_project_tables_configs_resolve_against_the_project_references(name):
    """Every row of config/tables/*.yaml finds its printed reference row (no results needed)."""
    references = load_references(ROOT / "config/reference")
    values = load_metric_values(METRICS)
    for table_id, table in load_tables_config(ROOT / "config/tables" / name).items():
        reference = references[table.reference] if table.reference else None
        data = paper_table_data(table, values, reference, table_id)
        assert len(data) == len(table.rows) * sum(len(group.metrics) for group in table.columns)
        if reference is not None:
            assert data["paper"].notna().any(), table_id


def test_baseline_difference_is_each_rows_mean_minus_the_baselines(tmp_path):
    table = load_tables_config(TABLES)["versus"]
    data = paper_table_data(table, load_metric_values(METRICS), None, "test").set_index(["method", "metric"])
    # random: (10 + 12) / 2 = 11 box AP; moco_v2: (15.25 + 16.75) / 2 = 16
    assert data.at[("moco_v2", "bbox.AP"), "vs_baseline"] == pytest.approx(16.0 - 11.0)
    assert pd.isna(data.at[("random", "bbox.AP"), "vs_baseline"])  # the baseline itself
    assert pd.isna(data.at[("soco", "bbox.AP"), "vs_baseline"])  # no result yet


def test_baseline_that_is_no_rows_method_is_an_error_naming_it(tmp_path):
    config = tmp_path / "tables.yaml"
    config.write_text(
        "tables:\n  t:\n    caption: c\n    baseline: supervised\n"
        "    columns: [{benchmark: b, metrics: [bbox.AP]}]\n    rows: [{method: random}]\n"
    )
    with pytest.raises(ValueError, match="baseline: 'supervised' is not the method of any row"):
        load_tables_config(config)


def test_a_row_with_a_benchmark_suffix_reads_that_variant_of_each_column(tmp_path):
    """ReSim-FPN (backbone only) and ReSim-FPN^T: one run, the same protocol with two transfers."""
    config = tmp_path / "tables.yaml"
    config.write_text(
        "tables:\n  t:\n    caption: c\n    columns: [{benchmark: coco_1x, metrics: [bbox.AP]}]\n"
        "    rows: [{method: resim_fpn, epochs: 200, label: FPN, benchmark_suffix: _backbone},\n"
        "           {method: resim_fpn, epochs: 200, label: FPN^T}]\n"
    )
    values = pd.DataFrame(
        [("resim_fpn", "resim_fpn_r50_200ep", benchmark, 0, "bbox.AP", ap) for benchmark, ap in (("coco_1x_backbone", 39.5), ("coco_1x", 39.8))],
        columns=["method", "run", "benchmark", "seed", "metric", "value"],
    )
    data = paper_table_data(load_tables_config(config)["t"], values, None, "test")
    assert list(zip(data["row"], data["run"], data["benchmark"], data["mean"])) == [
        ("FPN", "resim_fpn_r50_200ep", "coco_1x", 39.5), ("FPN^T", "resim_fpn_r50_200ep", "coco_1x", 39.8),
    ]
