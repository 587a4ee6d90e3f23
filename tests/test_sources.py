"""Image sources: layouts -> sorted keyed lists, the TSV list, chunking, and decoding to RGB."""

from __future__ import annotations

import io
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from regioncl.data.sources import (
    UnreadableImage,
    chunk_of,
    decode_rgb,
    key_for,
    list_images,
    read_image_list,
    write_image_list,
)


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_keys_drop_the_extension_and_replace_slashes_and_dots():
    assert key_for("a/b.c/img.001.jpg") == "a__b_c__img_001"
    assert key_for("n01440764/n01440764_10026.JPEG") == "n01440764__n01440764_10026"
    assert key_for("/data/my photo.png") == "data__my_photo"


def test_non_ascii_names_get_distinct_keys_stable_across_unicode_forms():
    keys = {key_for("写真1.jpg"), key_for("画像1.jpg"), key_for("1.jpg")}
    assert len(keys) == 3
    assert key_for("写真1.jpg") == "__1-60a60a04"  # the hash of the path, not of anything per-run
    assert key_for(unicodedata.normalize("NFD", "a/café.jpg")) == key_for("a/café.jpg")
    assert re.fullmatch(r"a__cafe-[0-9a-f]{8}", key_for("a/café.jpg"))


def test_non_ascii_file_names_are_all_listed(tmp_path):
    for name in ["写真1.jpg", "画像1.jpg", "1.jpg"]:
        touch(tmp_path / name)
    entries = list_images("folder", tmp_path)
    assert sorted(path.name for _, path in entries) == ["1.jpg", "写真1.jpg", "画像1.jpg"]
    assert len({key for key, _ in entries}) == 3


def test_a_dangling_symlink_is_listed_and_reported_as_a_bad_file(tmp_path):
    from regioncl.proposals import ProposalSettings
    from regioncl.proposals.chunk import BadImage, propose_image

    touch(tmp_path / "good.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    entries = list_images("folder", tmp_path)
    assert [key for key, _ in entries] == ["gone", "good"]
    result = propose_image(("gone", str(tmp_path / "gone.jpg"), ProposalSettings()))
    assert isinstance(result, BadImage) and "cannot read" in result.reason and "No such file" in result.reason


def test_folder_lists_every_image_recursively_sorted_by_key(tmp_path):
    for name in ["b.png", "a/x.JPEG", "a/y.jpeg", "c/d/e.bmp", "z.webp", "notes.txt", "a/readme.md"]:
        touch(tmp_path / name)
    entries = list_images("folder", tmp_path)
    assert entries == [
        ("a__x", tmp_path / "a/x.JPEG"),
        ("a__y", tmp_path / "a/y.jpeg"),
        ("b", tmp_path / "b.png"),
        ("c__d__e", tmp_path / "c/d/e.bmp"),
        ("z", tmp_path / "z.webp"),
    ]


@pytest.mark.parametrize(
    ("kind", "files", "keys"),
    [
        (
            "imagenet",
            ["train/n01/n01_1.JPEG", "train/n02/n02_7.JPEG", "val/n01/v.JPEG"],
            ["n01__n01_1", "n02__n02_7"],
        ),
        ("coco", ["train2017/000000000009.jpg", "val2017/000000000139.jpg"], ["000000000009"]),
        ("embedded", ["unlabeled/00001.jpg", "train/00002.jpg"], ["00001"]),
    ],
)
def test_dataset_layouts_list_only_their_training_images(tmp_path, kind, files, keys):
    for name in files:
        touch(tmp_path / name)
    assert [key for key, _ in list_images(kind, tmp_path)] == keys


def test_filelist_resolves_relative_paths_and_skips_comments(tmp_path):
    touch(tmp_path / "imgs/a.jpg")
    absolute = touch(tmp_path / "other/b.png")
    (tmp_path / "list.txt").write_text(f"# images\nimgs/a.jpg\n\n{absolute}\n")
    entries = list_images("filelist", tmp_path / "list.txt")
    assert entries == [("imgs__a", tmp_path / "imgs/a.jpg"), (key_for(str(absolute)), absolute)]


def test_filelist_names_a_missing_image_with_its_line(tmp_path):
    (tmp_path / "list.txt").write_text("missing.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"list.txt:1: image 'missing.jpg' does not exist"):
        list_images("filelist", tmp_path / "list.txt")


def test_missing_or_empty_roots_name_the_root_and_the_expected_layout(tmp_path):
    missing = re.escape(f"{tmp_path / 'nope'} does not exist; expected root/train2017")
    with pytest.raises(FileNotFoundError, match=missing):
        list_images("coco", tmp_path / "nope")
    touch(tmp_path / "train/n01/readme.txt")
    with pytest.raises(FileNotFoundError, match=r"no images in .*expected root/train/<wnid>/\*\.JPEG"):
        list_images("imagenet", tmp_path)
    with pytest.raises(ValueError, match="kind 'voc' is unknown"):
        list_images("voc", tmp_path)


def test_two_files_with_the_same_key_are_an_error(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "a.png")
    with pytest.raises(ValueError, match="both map to sample key 'a'"):
        list_images("folder", tmp_path)


def test_image_list_round_trips_and_rejects_malformed_lines(tmp_path):
    entries = [("b", Path("/x/b.jpg")), ("a", Path("rel/a b.png"))]
    write_image_list(entries, tmp_path / "list.tsv")
    assert (tmp_path / "list.tsv").read_text() == "a\trel/a b.png\nb\t/x/b.jpg\n"
    assert read_image_list(tmp_path / "list.tsv") == sorted(entries)
    (tmp_path / "bad.tsv").write_text("a\trel/a.png\nb.jpg\t/x/b.jpg\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'key<TAB>path'"):
        read_image_list(tmp_path / "bad.tsv")


@given(st.integers(0, 60), st.integers(1, 12), st.randoms())
def test_chunks_are_a_contiguous_partition_with_sizes_within_one(n, num_chunks, random):
    entries = [(f"k{i:03d}", Path(f"{i}.jpg")) for i in range(n)]
    shuffled = list(entries)
    random.shuffle(shuffled)
    chunks = [chunk_of(shuffled, c, num_chunks) for c in range(num_chunks)]
    assert [entry for chunk in chunks for entry in chunk] == entries
    sizes = [len(chunk) for chunk in chunks]
    assert max(sizes) - min(sizes) <= 1


def test_chunk_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"chunk must be in \[0, 3\]"):
        chunk_of([], 4, 4)


# --- decoding ---------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["CMYK", "L", "RGBA", "P"])
def test_non_rgb_images_decode_to_rgb_with_their_colours(mode):
    original = Image.new("RGB", (24, 16), (200, 30, 40))
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    image, extension = decode_rgb(encode(original.convert(mode), fmt))
    assert image.mode == "RGB" and image.size == (24, 16)
    expected = np.asarray(original.convert(mode).convert("RGB"))[8, 12]
    assert np.abs(np.asarray(image)[8, 12].astype(int) - expected).max() <= 3
    assert extension == fmt.lower().replace("jpeg", "jpg")
    if mode == "CMYK":  # Adobe's inverted CMYK must come back red, not cyan
        assert np.abs(np.asarray(image)[8, 12].astype(int) - [200, 30, 40]).max() <= 3


def test_the_extension_comes_from_the_content_not_the_name():
    assert decode_rgb(encode(Image.new("RGB", (8, 8)), "PNG"))[1] == "png"


@pytest.mark.parametrize(
    ("data", "limits", "reason"),
    [
        (b"", {}, "empty file"),
        (b"hello\n" * 20, {}, "cannot decode"),
        (encode(Image.new("RGB", (40, 30)), "JPEG")[:300], {}, "cannot decode"),
        (encode(Image.new("RGB", (40, 30)), "GIF"), {}, "unsupported format GIF"),
        (encode(Image.new("RGB", (1, 30)), "PNG"), {"min_side": 8}, "too small: 1x30"),
        (encode(Image.new("RGB", (40, 30)), "PNG"), {"max_pixels": 1000}, "too large: 40x30"),
    ],
)
def test_bad_files_raise_with_the_reason(data, limits, reason):
    with pytest.raises(UnreadableImage, match=reason):
        decode_rgb(data, **limits)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped():
    ramp = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    png = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    image, extension = decode_rgb(png)
    pixels = np.asarray(image)
    assert extension == "png" and image.mode == "RGB"
    assert np.array_equal(pixels[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert pixels.mean() == pytest.approx(127.5, abs=1)  # a mid-grey ramp, not near-white


def smooth_jpeg() -> bytes:
    yy, xx = np.mgrid[:96, :128]
    pixels = np.stack([xx * 2, yy * 2, (xx + yy)], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG")


def test_a_jpeg_with_damaged_scan_data_is_rejected_with_libjpegs_reason():
    data = bytearray(smooth_jpeg())
    scan = data.index(b"\xff\xda") + 40
    damaged = bytes(data[:scan] + data[scan + 150 :])  # a hole in the entropy-coded data
    Image.open(io.BytesIO(damaged)).load()  # PIL alone accepts it
    with pytest.raises(UnreadableImage, match=r"damaged JPEG scan data \(libjpeg: Corrupt JPEG data"):
        decode_rgb(damaged)
    assert decode_rgb(damaged, check_jpeg_scan=False)[0].size == (128, 96)
    assert decode_rgb(bytes(data))[1] == "jpg"


def test_a_camera_mpo_is_a_jpeg_of_its_first_frame():
    first = Image.open(io.BytesIO(smooth_jpeg()))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[Image.new("RGB", (128, 96), (0, 255, 0))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    image, extension = decode_rgb(buffer.getvalue())
    assert extension == "jpg"
    assert np.abs(np.asarray(image).astype(int) - np.asarray(first.convert("RGB")).astype(int)).mean() < 3
