"""Proposals: SoCo's box filter, the resize policy of selective search, and the chunk job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncl.data.embedded import EmbeddedSettings, generate_embedded
from regioncl.data.proposals_file import read_proposals
from regioncl.data.shards import write_shard
from regioncl.data.sources import list_images, write_image_list
from regioncl.proposals.chunk import ImageProposals, ProposalSettings, propose_image, run_chunk
from regioncl.proposals.filters import (
    RULES,
    BoxFilterSettings,
    filter_boxes,
    random_boxes,
    rule_masks,
)
from regioncl.proposals.released import INSTALL_HINT, soco_texture_histogram
from regioncl.proposals.selective_search import (
    SOCO_RELEASED,
    SelectiveSearchSettings,
    rects_to_boxes,
    segmentation_size,
    selective_search,
)

PAPER_ONLY = BoxFilterSettings(min_size_px=0.0, fallback=False)


# --- filter: hand-computed boxes on a 100 x 100 image (sqrt(WH) = 100) ---------------------


def test_paper_rule_keeps_boxes_inside_ratio_and_relative_size_ranges():
    boxes = np.array(
        [
            [0, 0, 50, 50],  # ratio 1, relative size 0.5: kept
            [0, 0, 90, 90],  # relative size 0.9 > 0.8
            [10, 10, 30, 30],  # relative size 0.2 < 0.3
            [0, 0, 90, 20],  # ratio 4.5 > 3
            [0, 0, 60, 20],  # ratio exactly 3, relative size sqrt(1200)/100 = 0.346: kept
            [5, 5, 25, 65],  # ratio exactly 1/3, relative size 0.346: kept
        ],
        dtype=np.float64,
    )
    kept, rule = filter_boxes(boxes, 100, 100, PAPER_ONLY)
    assert rule == "paper"
    np.testing.assert_array_equal(kept, boxes[[0, 4, 5]])


def test_released_min_size_drops_boxes_thinner_than_32_original_px():
    boxes = np.array([[0, 0, 50, 50], [0, 0, 60, 20], [5, 5, 25, 65]], dtype=np.float64)
    kept, rule = filter_boxes(boxes, 100, 100, BoxFilterSettings(min_size_px=32.0, fallback=False))
    assert rule == "paper"
    np.testing.assert_array_equal(kept, boxes[[0]])


def test_fallback_chain_relaxes_ratio_then_size_then_whole_image():
    settings = BoxFilterSettings()  # min 32 px, fallback on
    too_big = [0, 0, 95, 95]  # ratio 1 but relative size 0.95: ratio_only
    too_long = [0, 0, 100, 33]  # ratio 3.03: size_only
    too_small = [0, 0, 10, 10]  # under 32 px: nothing
    kept, rule = filter_boxes(np.array([too_big, too_long, too_small], float), 100, 100, settings)
    assert (rule, kept.tolist()) == ("ratio_only", [too_big])
    kept, rule = filter_boxes(np.array([too_long, too_small], float), 100, 100, settings)
    assert (rule, kept.tolist()) == ("size_only", [too_long])
    kept, rule = filter_boxes(np.array([too_small], float), 100, 60, settings)
    assert (rule, kept.tolist()) == ("whole_image", [[0.0, 0.0, 100.0, 60.0]])
    kept, rule = filter_boxes(np.zeros((0, 4)), 100, 60, settings)
    assert rule == "whole_image"


def test_without_fallback_an_image_may_keep_no_box():
    kept, rule = filter_boxes(np.array([[0, 0, 10, 10]], float), 100, 100, PAPER_ONLY)
    assert rule == "paper" and kept.shape == (0, 4)


def test_duplicates_are_dropped_and_max_boxes_keeps_the_first_in_order():
    boxes = np.array([[0, 0, 50, 50], [0, 0, 50, 50], [10, 0, 60, 50], [20, 0, 70, 50]], float)
    kept, _ = filter_boxes(boxes, 100, 100, BoxFilterSettings(max_boxes=2))
    np.testing.assert_array_equal(kept, boxes[[0, 2]])


def test_degenerate_boxes_are_never_kept():
    boxes = np.array([[10, 10, 10, 60], [10, 10, 60, 10], [60, 60, 10, 10]], float)
    assert filter_boxes(boxes, 100, 100, BoxFilterSettings(min_size_px=0.0))[1] == "whole_image"


# --- filter: properties -----------------------------------------------------------------------

coordinate = st.floats(min_value=-10, max_value=300, allow_nan=False)
box_lists = st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), max_size=30)
filter_settings = st.builds(
    BoxFilterSettings,
    max_aspect=st.floats(min_value=1.0, max_value=5.0),
    min_rel_size=st.floats(min_value=0.0, max_value=0.5),
    max_rel_size=st.floats(min_value=0.5, max_value=1.2),
    min_size_px=st.sampled_from([0.0, 8.0, 32.0]),
    fallback=st.booleans(),
    max_boxes=st.one_of(st.none(), st.integers(min_value=1, max_value=5)),
)


@settings(max_examples=300, deadline=None)
@given(box_lists, st.integers(8, 300), st.integers(8, 300), filter_settings)
def test_kept_boxes_satisfy_the_rule_they_report_and_no_stricter_rule_had_any(rows, width, height, s):
    boxes = np.array(rows, dtype=np.float64).reshape(-1, 4)
    kept, rule = filter_boxes(boxes, width, height, s)
    assert rule in RULES
    assert s.max_boxes is None or len(kept) <= s.max_boxes
    all_masks = rule_masks(boxes, width, height, s)
    if not s.fallback:
        assert rule == "paper"
        assert len(kept) == min(len(np.unique(boxes[all_masks["paper"]], axis=0)), s.max_boxes or len(boxes))
    if rule == "whole_image":
        np.testing.assert_array_equal(kept, [[0, 0, width, height]])
    else:
        assert rule_masks(kept, width, height, s)[rule].all()
        assert all(any((row == box).all() for box in boxes) for row in kept)
    stricter = RULES[: RULES.index(rule)]
    assert not any(all_masks[r].any() for r in stricter)


@settings(max_examples=50, deadline=None)
@given(st.integers(40, 600), st.integers(40, 600), st.text(min_size=1, max_size=12), st.integers(0, 2**31))
def test_random_boxes_pass_the_paper_rule_and_depend_only_on_seed_and_key(width, height, key, seed):
    s = BoxFilterSettings()
    boxes = random_boxes(key, width, height, 20, seed, s)
    assert rule_masks(boxes, width, height, s)["paper"].all()
    np.testing.assert_array_equal(boxes, random_boxes(key, width, height, 20, seed, s))


def test_random_boxes_differ_between_keys_and_fill_the_requested_count():
    s = BoxFilterSettings()
    a = random_boxes("a", 200, 150, 50, 0, s)
    assert a.shape == (50, 4)
    assert not np.array_equal(a, random_boxes("b", 200, 150, 50, 0, s))


# --- settings ------------------------------------------------------------------------------------


def test_settings_round_trip_through_dicts_and_reject_unknown_keys():
    settings = ProposalSettings.from_dict(
        {"mode": "random", "seed": 3, "selective_search": {"max_side": 256}, "filter": {"max_boxes": 10}}
    )
    assert settings.selective_search.max_side == 256 and settings.filter.max_boxes == 10
    assert ProposalSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match=r"proposals.filter: unknown key\(s\) \['min_ratio'\]"):
        ProposalSettings.from_dict({"filter": {"min_ratio": 0.3}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modes'\]"):
        ProposalSettings.from_dict({"modes": "random"})


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match="max_side .* or min_side"):
        SelectiveSearchSettings(max_side=256, min_side=128)
    with pytest.raises(ValueError, match="selective_search.mode"):
        SelectiveSearchSettings(mode="slow")
    with pytest.raises(ValueError, match="selective_search.max_scale"):
        SelectiveSearchSettings(max_scale=0.0)
    with pytest.raises(ValueError, match="proposals.mode"):
        ProposalSettings(mode="edge_boxes")
    with pytest.raises(ValueError, match="filter.max_aspect"):
        BoxFilterSettings(max_aspect=0.5)


# --- selective search: resize policy and mapping back ------------------------------------------


def test_resize_policy_shrinks_never_enlarges():
    assert segmentation_size(1000, 500, SelectiveSearchSettings(max_side=256)) == (256, 128)
    assert segmentation_size(1000, 500, SelectiveSearchSettings(min_side=100)) == (200, 100)
    assert segmentation_size(100, 80, SelectiveSearchSettings(max_side=256)) == (100, 80)
    assert segmentation_size(100, 80, SelectiveSearchSettings()) == (100, 80)


def test_max_scale_shrinks_small_images_by_that_factor_and_large_ones_to_the_side_cap():
    settings = SelectiveSearchSettings(max_side=96, max_scale=0.25)
    assert segmentation_size(256, 200, settings) == (64, 50)
    assert segmentation_size(500, 375, settings) == (96, 72)
    assert segmentation_size(1000, 563, settings) == (96, 54)
    assert segmentation_size(256, 200, SelectiveSearchSettings(max_scale=0.5)) == (128, 100)


def test_rects_map_to_continuous_original_pixels():
    # A rect covering columns 10..39 and rows 5..44 of a 4x smaller image.
    boxes = rects_to_boxes(np.array([[10, 5, 30, 40]]), (100, 50), (400, 200))
    np.testing.assert_array_equal(boxes, [[40.0, 20.0, 160.0, 180.0]])


def rectangle_image() -> tuple[np.ndarray, np.ndarray]:
    """A 160 x 120 noisy grey image with one red rectangle; returns (image, its box)."""
    image = np.random.default_rng(0).integers(90, 110, (120, 160, 3)).astype(np.uint8)
    image[33:91, 37:118] = (200, 40, 40)
    return image, np.array([37.0, 33.0, 118.0, 91.0])


@pytest.mark.parametrize("max_side", [None, 64])
def test_the_strong_rectangle_is_recovered_in_original_pixels(max_side):
    image, truth = rectangle_image()
    settings = SelectiveSearchSettings(max_side=max_side)
    boxes = selective_search(image, settings)
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 160).all() and (boxes[:, [1, 3]] <= 120).all()
    # One segmented pixel is this many original pixels: the best box is within one of them.
    scale = 160 / segmentation_size(160, 120, settings)[0]
    closest = boxes[np.abs(boxes - truth).max(axis=1).argmin()]
    assert np.abs(closest - truth).max() <= scale


def test_selective_search_order_does_not_depend_on_what_ran_before():
    image, _ = rectangle_image()
    other = np.ascontiguousarray(image[::-1, ::-1])
    settings = SelectiveSearchSettings()
    first = selective_search(image, settings)
    selective_search(other, settings)
    np.testing.assert_array_equal(first, selective_search(image, settings))


# --- SoCo's released algorithm (optional extra soco-proposals) --------------------------------


def needs_released_package():
    return pytest.importorskip("selectivesearch", reason=f"SoCo's released selective search: {INSTALL_HINT}")


def test_soco_texture_histogram_counts_every_lbp_code_of_each_channel():
    codes = np.array([[0, 128, 255], [7, 200, 1], [254, 3, 100]], dtype=np.float64)
    histogram = soco_texture_histogram(codes)
    assert histogram.shape == (30,)
    np.testing.assert_allclose(histogram.reshape(3, 10).sum(axis=1), 1.0)
    assert histogram[9] == pytest.approx(1 / 3)  # code 254 is in the last bin of channel 0


def test_released_mode_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "selectivesearch", None)  # import fails as if not installed
    image, _ = rectangle_image()
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        selective_search(image, SOCO_RELEASED)


@pytest.mark.parametrize("max_side", [None, 64])
def test_released_mode_recovers_the_rectangle_through_the_common_mapping(max_side):
    package = needs_released_package().selectivesearch
    texture_histogram = package._calc_texture_hist
    image, truth = rectangle_image()
    settings = SelectiveSearchSettings.from_dict(SOCO_RELEASED.to_dict() | {"max_side": max_side})
    boxes = selective_search(image, settings)
    assert package._calc_texture_hist is texture_histogram  # SoCo's change is undone after the call
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 160).all() and (boxes[:, [1, 3]] <= 120).all()
    closest = boxes[np.abs(boxes - truth).max(axis=1).argmin()]
    if max_side is None:  # the rectangle's segment spans exactly its pixels
        np.testing.assert_array_equal(closest, truth)
    else:
        assert np.abs(closest - truth).max() <= 160 / segmentation_size(160, 120, settings)[0]


def test_released_mode_proposals_go_through_the_filter_of_the_chunk_job(tmp_path):
    needs_released_package()
    image, truth = rectangle_image()
    Image.fromarray(image).save(tmp_path / "rectangle.png")
    settings = ProposalSettings(selective_search=SOCO_RELEASED)
    result = propose_image(("rectangle", str(tmp_path / "rectangle.png"), settings))
    assert isinstance(result, ImageProposals) and result.rule == "paper"
    assert rule_masks(result.boxes, 160, 120, BoxFilterSettings())["paper"].all()
    assert truth.tolist() in result.boxes.tolist() and len(result.boxes) < result.candidates


# --- chunk job -------------------------------------------------------------------------------


def textured(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Noise with a few coloured rectangles: enough structure for selective search."""
    pixels = rng.integers(60, 120, (height, width, 3)).astype(np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        w, h = int(rng.integers(16, width - x + 1)), int(rng.integers(16, height - y + 1))
        pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


GOOD = ["plain0", "plain1", "plain2", "plain3", "plain4", "cmyk", "rgba", "gray"]
BAD_REASONS = {
    "truncated": "cannot decode",
    "zero_bytes": "empty file",
    "text": "cannot decode",
    "one_pixel": "too small",
    "gif": "unsupported format GIF",
    "huge": "too large",
}
CHUNK_SETTINGS = ProposalSettings(
    selective_search=SelectiveSearchSettings(max_side=64), max_image_pixels=128 * 128
)


def write_test_images(folder: Path) -> None:
    """8 good images (RGB, CMYK, RGBA, grayscale) and one of each kind of bad file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        textured(rng, 96 - 4 * i, 80).save(folder / f"plain{i}.jpg", quality=90)
    textured(rng, 90, 70).convert("CMYK").save(folder / "cmyk.jpg")
    textured(rng, 72, 96).convert("RGBA").save(folder / "rgba.png")
    textured(rng, 80, 64).convert("L").save(folder / "gray.jpg")
    full = (folder / "plain0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image\n")
    Image.new("RGB", (1, 1)).save(folder / "one_pixel.png")
    textured(rng, 64, 64).save(folder / "gif.png", format="GIF")
    textured(rng, 150, 150).save(folder / "huge.jpg")


@pytest.fixture(scope="module")
def image_list(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_test_images(root / "imgs")
    out = root / "list.tsv"
    write_image_list(list_images("folder", root / "imgs"), out)
    return out


def test_chunk_keeps_every_good_image_and_names_each_bad_one(image_list, tmp_path):
    parquet, report_json = tmp_path / "c.parquet", tmp_path / "c.json"
    report = run_chunk(image_list, 0, 1, parquet, report_json, CHUNK_SETTINGS, processes=2)
    assert (report.images, report.good, report.bad) == (14, 8, 6)
    reasons = {item["key"]: item["reason"] for item in report.bad_files}
    assert set(reasons) == set(BAD_REASONS)
    for key, phrase in BAD_REASONS.items():
        assert phrase in reasons[key], (key, reasons[key])
    rows, recorded = read_proposals(tmp_path / "c.parquet")
    assert recorded == CHUNK_SETTINGS.to_dict()
    assert [row["key"] for row in rows] == sorted(GOOD)
    for row in rows:
        image = Image.open(row["path"])
        assert (row["width"], row["height"]) == image.size
        boxes = row["boxes"]
        assert len(boxes) >= 1 and row["rule"] in RULES
        assert (boxes >= 0).all()
        assert (boxes[:, 2] <= row["width"]).all() and (boxes[:, 3] <= row["height"]).all()
    on_disk = json.loads((tmp_path / "c.json").read_text())
    assert on_disk["good"] == 8 and sum(on_disk["rules"].values()) == 8
    assert on_disk["settings"] == CHUNK_SETTINGS.to_dict()


def test_chunk_parquet_is_byte_identical_whatever_the_number_of_processes(image_list, tmp_path):
    run_chunk(image_list, 0, 1, tmp_path / "a.parquet", tmp_path / "a.json", CHUNK_SETTINGS, processes=2)
    run_chunk(image_list, 0, 1, tmp_path / "b.parquet", tmp_path / "b.json", CHUNK_SETTINGS, processes=1)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_random_mode_chunks_split_the_list_and_keep_paper_boxes(image_list, tmp_path):
    settings = ProposalSettings(mode="random", random_boxes=10, seed=5, max_image_pixels=128 * 128)
    keys = []
    for chunk in range(3):
        run_chunk(image_list, chunk, 3, tmp_path / f"{chunk}.parquet", tmp_path / f"{chunk}.json", settings)
        table = pq.read_table(tmp_path / f"{chunk}.parquet").to_pylist()
        keys += [row["key"] for row in table]
        for row in table:
            boxes = np.asarray(row["boxes"]).reshape(-1, 4)
            assert row["rule"] == "paper" and len(boxes) == 10
            assert rule_masks(boxes, row["width"], row["height"], settings.filter)["paper"].all()
    assert keys == sorted(GOOD)


def test_a_chunk_without_any_good_image_fails_naming_the_chunk(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"")
    write_image_list([("bad", tmp_path / "bad.jpg")], tmp_path / "list.tsv")
    with pytest.raises(RuntimeError, match=r"chunk 0 of 1 .*no good image.*empty file"):
        run_chunk(tmp_path / "list.tsv", 0, 1, tmp_path / "c.parquet", tmp_path / "c.json", ProposalSettings())
    assert not (tmp_path / "c.parquet").exists()


# --- acceptance: a killed chunk job re-runs to byte-identical outputs ---------------------------

JOB_SETTINGS = '{"selective_search": {"mode": "fast", "max_side": 128}}'


def start_job(image_list: Path, out_dir: Path) -> subprocess.Popen:
    """``regioncl proposals run`` of the whole list with 2 processes, in its own process group."""
    command = [
        sys.executable, "-m", "regioncl.cli", "proposals", "run", "--list", str(image_list),
        "--chunk", "0", "--num-chunks", "1", "--processes", "2", "--settings", JOB_SETTINGS,
        "--out", str(out_dir / "chunk.parquet"), "--report", str(out_dir / "chunk.report.json"),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until_a_third_is_done(job: subprocess.Popen) -> None:
    """Block until the job's progress (stderr: plain lines off a terminal) shows a third of the images done."""
    os.set_blocking(job.stderr.fileno(), False)
    seen = b""
    while job.poll() is None:
        seen += job.stderr.read() or b""
        progress = re.findall(rb"(\d+)/(\d+) \(", seen)
        if progress and 3 * int(progress[-1][0]) >= int(progress[-1][1]):
            return
        time.sleep(0.05)
    raise AssertionError(f"the job ended before it could be killed midway: {seen.decode()[-2000:]}")


def finish(job: subprocess.Popen) -> None:
    _, stderr = job.communicate()
    assert job.returncode == 0, stderr.decode()[-2000:]


@pytest.mark.parametrize("num_images", [60, pytest.param(1000, marks=pytest.mark.slow)])
def test_a_chunk_job_killed_midway_reruns_to_byte_identical_proposals_and_shard(tmp_path, num_images):
    generate_embedded(tmp_path / "data", EmbeddedSettings(n_unlabeled=num_images, n_train=0, n_val=0, image_size=128))
    image_list = tmp_path / "list.tsv"
    write_image_list(list_images("embedded", tmp_path / "data"), image_list)

    finish(start_job(image_list, tmp_path / "whole"))
    write_shard(tmp_path / "whole" / "chunk.parquet", tmp_path / "whole" / "chunk.tar")
    report = json.loads((tmp_path / "whole" / "chunk.report.json").read_text())
    assert (report["images"], report["good"], report["processes"]) == (num_images, num_images, 2)

    killed = start_job(image_list, tmp_path / "again")
    wait_until_a_third_is_done(killed)
    os.killpg(killed.pid, signal.SIGKILL)  # the CLI and its worker processes
    killed.wait()
    killed.stderr.close()
    # Nothing is written before the chunk is complete: no output, no partial or temporary file.
    assert list((tmp_path / "again").iterdir()) == []

    finish(start_job(image_list, tmp_path / "again"))
    write_shard(tmp_path / "again" / "chunk.parquet", tmp_path / "again" / "chunk.tar")
    for name in ("chunk.parquet", "chunk.tar"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(path.name for path in (tmp_path / "again").iterdir()) == [
        "chunk.parquet", "chunk.report.json", "chunk.tar"
    ]
