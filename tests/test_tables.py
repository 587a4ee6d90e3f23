"""The summary table against golden files, and its errors on bad metrics files."""

import json
from pathlib import Path

import pytest

from regioncl.tables.summary import load_metrics, summarize, write_summary

FIXTURES = Path(__file__).parent / "fixtures" / "tables"
METRICS = sorted((FIXTURES / "metrics").glob("*.json"))


def test_summary_matches_golden_markdown_and_csv(tmp_path):
    write_summary(METRICS, tmp_path / "summary.md", tmp_path / "summary.csv")
    assert (tmp_path / "summary.md").read_text() == (FIXTURES / "expected_summary.md").read_text()
    assert (tmp_path / "summary.csv").read_text() == (FIXTURES / "expected_summary.csv").read_text()


def test_summary_is_mean_and_sample_std_over_seeds_with_baseline_first():
    table = summarize(load_metrics(METRICS))
    assert list(table["method"]) == ["random", "moco_v2"]
    moco = table[table["method"] == "moco_v2"].iloc[0]
    assert moco["box AP mean"] == pytest.approx((15.25 + 16.75) / 2)
    # sample std of two values a, b is |a - b| / sqrt(2)
    assert moco["box AP std"] == pytest.approx(1.5 / 2**0.5)
    assert moco["seeds"] == 2


def test_metrics_file_without_run_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "random", "benchmark": "b", "seed": 0, "metrics": {}}))
    with pytest.raises(ValueError, match=r"bad\.json.*run"):
        load_metrics([bad])


def test_metrics_without_ap50_is_an_error_naming_the_metric(tmp_path):
    bad = tmp_path / "bad.json"
    record = {"method": "m", "run": "r", "benchmark": "b", "seed": 0, "metrics": {"bbox": {"AP": 1, "AP75": 1}}}
    bad.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="AP50"):
        load_metrics([bad])


def test_undefined_metric_is_missing_not_an_error(tmp_path):
    from regioncl.tables.metrics import load_metric_values

    path = tmp_path / "m.json"
    record = {"method": "m", "run": "r", "benchmark": "b", "seed": 0,
              "metrics": {"bbox": {"AP": 1.5, "AP50": 3.0, "AP75": 1.0, "APl": None}}}
    path.write_text(json.dumps(record))
    values = load_metric_values([path])
    assert set(values["metric"]) == {"bbox.AP", "bbox.AP50", "bbox.AP75"}
    assert values.loc[values["metric"] == "bbox.AP", "value"].item() == 1.5


def probe_record(path, run, method, accuracy):
    record = {"method": method, "run": run, "benchmark": "embedded_frcnn_r18fpn", "seed": 0,
              "metrics": {"probe": {"accuracy": accuracy}}}
    path.write_text(json.dumps(record))
    return path


def test_a_probe_record_adds_a_column_beside_the_ap_of_the_same_run(tmp_path):
    probes = [probe_record(tmp_path / "p0.json", "random", "random", 25.0),
              probe_record(tmp_path / "p1.json", "moco_v2_r18_20ep", "moco_v2", 70.5)]
    table = summarize(load_metrics(METRICS + probes))
    assert list(table.columns)[-3:] == ["probe accuracy mean", "probe accuracy std", "seeds"]
    moco = table[table["method"] == "moco_v2"].iloc[0]
    assert moco["probe accuracy mean"] == 70.5 and moco["box AP mean"] == pytest.approx(16.0)
    assert moco["seeds"] == 2  # the AP seeds; the probe has one number
    write_summary(METRICS + probes, tmp_path / "s.md", tmp_path / "s.csv")
    lines = (tmp_path / "s.md").read_text().splitlines()
    assert lines[0].rstrip(" |").endswith("probe accuracy")
    assert lines[3].rstrip(" |").endswith("70.5")  # no ± for a single number


def test_the_embedded_tables_show_the_probe_column_against_random(tmp_path):
    from regioncl.tables.layout import load_tables_config
    from regioncl.tables.metrics import load_metric_values
    from regioncl.tables.paper import paper_table_data
    from regioncl.tables.render import to_markdown

    probes = [probe_record(tmp_path / "p0.json", "random", "random", 25.0),
              probe_record(tmp_path / "p1.json", "moco_v2_r18_8ep", "moco_v2", 70.5)]
    root = Path(__file__).resolve().parents[1]
    table = load_tables_config(root / "config" / "tables" / "embedded.yaml")["embedded"]
    data = paper_table_data(table, load_metric_values(probes), None, "test")
    probe = data[data["metric"] == "probe.accuracy"].set_index("run")
    assert probe.at["moco_v2_r18_8ep", "vs_baseline"] == pytest.approx(45.5)
    markdown = to_markdown(table, data)
    assert "probe accuracy" in markdown and "70.5 (+45.5)" in markdown
