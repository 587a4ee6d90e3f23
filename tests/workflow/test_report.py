"""`snakemake --report` builds a self-contained HTML report from a finished run."""

import zipfile

import pytest
from conftest import TINY_CONFIG, snakemake


@pytest.mark.slow  # a whole tiny run (30 s alone, minutes on shared cores) plus two reports
def test_report_of_the_tiny_run_holds_the_summary_tables(tmp_path):
    snakemake(tmp_path, "--cores", "2", "--configfile", str(TINY_CONFIG))
    report = tmp_path / "report.zip"
    # The .zip form keeps every result as a file, so the test can read what went in; the
    # .html form embeds the same results into one page.
    snakemake(tmp_path, "--configfile", str(TINY_CONFIG), "--report", str(report))
    with zipfile.ZipFile(report) as archive:
        names = archive.namelist()
        summary = next(name for name in names if name.endswith("/summary.md"))
        assert archive.read(summary) == (tmp_path / "results/tables/summary.md").read_bytes()
        assert any(name.endswith("/summary.csv") for name in names)
    html = tmp_path / "report.html"
    snakemake(tmp_path, "--configfile", str(TINY_CONFIG), "--report", str(html))
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "summary.md" in page and "Summary table" in page
