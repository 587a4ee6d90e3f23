"""`snakemake --report` builds a self-contained HTML report from a finished run."""

import zipfile

import pytest
from conftest import TINY_CONFIG, snakemake


@pytest.mark.slow  # two reports (and the shared tiny run, if no test ran it before)
def test_report_of_the_tiny_run_holds_the_summary_tables(tiny_run, tmp_path):
    report = tmp_path / "report.zip"  # beside, not inside, the shared run
    # The .zip form keeps every result as a file, so the test can read what went in; the
    # .html form embeds the same results into one page.
    snakemake(tiny_run, "--configfile", str(TINY_CONFIG), "--report", str(report))
    with zipfile.ZipFile(report) as archive:
        names = archive.namelist()
        summary = next(name for name in names if name.endswith("/summary.md"))
        assert archive.read(summary) == (tiny_run / "results/tables/summary.md").read_bytes()
        assert any(name.endswith("/summary.csv") for name in names)
    html = tmp_path / "report.html"
    snakemake(tiny_run, "--configfile", str(TINY_CONFIG), "--report", str(html))
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "summary.md" in page and "Summary table" in page
    # The landing page itself shows the headline table and the loss curves (embedded SVG).
    assert "Headline table" in page and "Training curves" in page
    headline = (tiny_run / "results/tables/summary.md").read_text().splitlines()[2]  # the first row
    assert headline.split("|")[1].strip() in page
    assert page.count("<svg") >= 2
