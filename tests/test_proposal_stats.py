"""`regioncl proposals stats`: the summary of real chunk jobs, checked against hand-counted values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regioncl.data.sources import list_images, write_image_list
from regioncl.proposals.chunk import ProposalSettings, run_chunk
from regioncl.proposals.stats import proposal_stats

# Random mode keeps exactly 5 paper-rule boxes on a large image; a 20 x 20 image has no room for a
# 32 px box, so it falls back to the whole image (1 box).
SETTINGS = ProposalSettings(mode="random", random_boxes=5, seed=0)


@pytest.fixture(scope="module")
def chunks(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """Two chunks of 6 files: 4 large images, one 20 x 20, one zero-byte file."""
    root = tmp_path_factory.mktemp("stats")
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (90, 120, 3)).astype(np.uint8)).save(folder / f"a{i}.jpg")
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "b_small.png")
    (folder / "c_empty.jpg").write_bytes(b"")
    write_image_list(list_images("folder", folder), root / "list.tsv")
    reports, parquets = [], []
    for chunk in range(2):
        parquets.append(root / f"{chunk}.parquet")
        reports.append(root / f"{chunk}.json")
        run_chunk(root / "list.tsv", chunk, 2, parquets[-1], reports[-1], SETTINGS)
    return reports, parquets


def test_stats_count_boxes_rules_and_bad_files_of_all_chunks(chunks, tmp_path, capsys):
    reports, parquets = chunks
    stats = proposal_stats(reports, parquets, tmp_path / "out" / "stats.json")
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert (stats["chunks"], stats["images"], stats["good"], stats["bad"]) == ([0, 1], 6, 5, 1)
    assert stats["proposals_per_image"] == {"mean": 21 / 5, "median": 5.0, "min": 1, "max": 5}
    assert stats["rules"] == {"paper": 4, "ratio_only": 0, "size_only": 0, "whole_image": 1}
    [bad] = stats["bad_files"]
    assert (bad["key"], bad["chunk"]) == ("c_empty", 1) and "empty file" in bad["reason"]
    assert stats["settings"] == SETTINGS.to_dict()
    summary = capsys.readouterr().err
    assert "6 images, 5 good, 1 bad" in summary and "c_empty.jpg: empty file" in summary


def test_throughput_is_images_over_process_seconds(chunks, tmp_path):
    reports, parquets = chunks
    # Pretend chunk 0 ran 2 processes for 4 s and chunk 1 one process for 2 s: 6 images / 10 s.
    edited = []
    for path, (seconds, processes) in zip(reports, [(4.0, 2), (2.0, 1)]):
        report = json.loads(path.read_text())
        report.update(seconds=seconds, processes=processes)
        edited.append(tmp_path / path.name)
        edited[-1].write_text(json.dumps(report))
    speed = proposal_stats(edited, parquets, tmp_path / "stats.json")["throughput"]
    assert speed["images_per_second"] == pytest.approx(6 / 6)
    assert speed["images_per_second_per_process"] == pytest.approx(6 / 10)
    assert speed["core_hours_per_million_images"] == pytest.approx(1e6 / 0.6 / 3600)


def test_reports_and_parquets_of_different_chunks_are_refused(chunks, tmp_path):
    reports, parquets = chunks
    with pytest.raises(ValueError, match="reports count 2 good images but the parquets hold 3"):
        proposal_stats(reports[1:], parquets[:1], tmp_path / "stats.json")
    assert not (tmp_path / "stats.json").exists()


def test_a_file_that_is_not_a_report_is_named(chunks, tmp_path):
    _, parquets = chunks
    (tmp_path / "other.json").write_text(json.dumps({"chunk": 0}))
    with pytest.raises(ValueError, match=r"other.json: not a proposals chunk report \(missing num_chunks"):
        proposal_stats([tmp_path / "other.json"], parquets, tmp_path / "stats.json")
