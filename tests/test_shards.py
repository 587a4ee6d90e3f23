"""WebDataset shards: what the writer packs, and how ShardStream deals samples out."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from regioncl.data.proposals_file import read_proposals
from regioncl.data.shards import CorruptShardError, ShardStream, write_shard
from regioncl.data.sources import list_images, write_image_list
from regioncl.proposals.chunk import ProposalSettings, run_chunk

SETTINGS = ProposalSettings(mode="random", random_boxes=5, seed=1)
NUM_IMAGES = 13


def write_images(folder: Path) -> None:
    """13 small noisy images; one CMYK JPEG and one PNG behind a .jpg name."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        image = Image.fromarray(rng.integers(0, 256, (48 + i, 64, 3)).astype(np.uint8))
        if i == 3:
            image.convert("CMYK").save(folder / f"img{i:02d}.jpg")
        elif i == 5:
            image.save(folder / f"img{i:02d}.jpg", format="PNG")
        else:
            image.save(folder / f"img{i:02d}.jpg")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """Two shards (chunks 0 and 1 of 2) of random-box proposals."""
    root = tmp_path_factory.mktemp("shards")
    write_images(root / "imgs")
    write_image_list(list_images("folder", root / "imgs"), root / "list.tsv")
    paths = []
    for chunk in range(2):
        parquet = root / f"{chunk}.parquet"
        run_chunk(root / "list.tsv", chunk, 2, parquet, root / f"{chunk}.json", SETTINGS)
        assert write_shard(parquet, root / f"{chunk}.tar") == len(read_proposals(parquet)[0])
        paths.append(root / f"{chunk}.tar")
    return paths


def test_shard_holds_original_bytes_under_the_real_format_and_the_boxes(shards):
    rows, _ = read_proposals(shards[0].with_suffix(".parquet"))
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
        names = [member.name for member in members]
        assert all(member.mtime == 0 for member in members)
        expected = []
        for row in rows:
            extension = "png" if row["key"] == "img05" else "jpg"
            expected += sorted([f"{row['key']}.{extension}", f"{row['key']}.json"])  # TarWriter sorts
            image_bytes = tar.extractfile(f"{row['key']}.{extension}").read()
            assert image_bytes == Path(row["path"]).read_bytes()
            meta = json.loads(tar.extractfile(f"{row['key']}.json").read())
            assert meta == {
                "width": row["width"],
                "height": row["height"],
                "boxes": row["boxes"].tolist(),
                "proposals": SETTINGS.to_dict(),
            }
    assert names == expected


def test_rewriting_a_shard_gives_identical_bytes(shards, tmp_path):
    write_shard(shards[1].with_suffix(".parquet"), tmp_path / "again.tar")
    assert (tmp_path / "again.tar").read_bytes() == shards[1].read_bytes()


def test_webdataset_reads_the_shards(shards):
    samples = list(wds.WebDataset([str(path) for path in shards], shardshuffle=False))
    assert len(samples) == NUM_IMAGES
    assert {sample["__key__"] for sample in samples} == {f"img{i:02d}" for i in range(NUM_IMAGES)}


def test_samples_are_rgb_images_with_float32_boxes_in_their_pixels(shards):
    stream = ShardStream(shards, seed=0)
    assert stream.num_samples == NUM_IMAGES
    samples = list(stream)
    assert sorted(sample["key"] for sample in samples) == [f"img{i:02d}" for i in range(NUM_IMAGES)]
    for sample in samples:
        assert sample["image"].mode == "RGB"
        assert sample["image"].size == (sample["width"], sample["height"])
        boxes = sample["boxes"]
        assert boxes.dtype == np.float32 and boxes.shape == (5, 4)
        assert (boxes >= 0).all()
        assert (boxes[:, 2] <= sample["width"]).all() and (boxes[:, 3] <= sample["height"]).all()


def epoch_keys(shards: list[Path], epoch: int, num_workers: int = 2, seed: int = 7) -> list[list[str]]:
    """Keys each of 2 ranks sees in ``epoch``, through a real DataLoader."""
    per_rank = []
    for rank in range(2):
        stream = ShardStream(shards, seed=seed, rank=rank, world_size=2)
        stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
        per_rank.append([sample["key"] for sample in loader])
    return per_rank


def test_ranks_and_workers_get_disjoint_samples_covering_all_reproducibly(shards):
    first = epoch_keys(shards, epoch=3)
    everything = first[0] + first[1]
    assert sorted(everything) == [f"img{i:02d}" for i in range(NUM_IMAGES)]  # disjoint and complete
    assert abs(len(first[0]) - len(first[1])) <= 1
    assert epoch_keys(shards, epoch=3) == first
    assert epoch_keys(list(reversed(shards)), epoch=3) == first
    assert epoch_keys(shards, epoch=3, num_workers=0) == first  # a rank's order ignores its workers
    assert epoch_keys(shards, epoch=4) != first


def test_an_epoch_order_does_not_depend_on_earlier_iteration(shards):
    used = ShardStream(shards, seed=2)
    list(used)
    used.set_epoch(5)
    fresh = ShardStream(shards, seed=2)
    fresh.set_epoch(5)
    assert [s["key"] for s in used] == [s["key"] for s in fresh]
    assert [s["key"] for s in used] != [s["key"] for s in ShardStream(shards, seed=3)]


@pytest.mark.parametrize("cut", ["mid_member", "between_samples", "end_marker"])
def test_a_truncated_shard_names_itself_and_says_to_rebuild(shards, tmp_path, cut):
    data = shards[0].read_bytes()
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
    # Offsets: inside the 3rd member's data; right after the 2nd sample; just before the
    # end-of-archive blocks.
    length = {
        "mid_member": members[2].offset_data + 10,
        "between_samples": members[4].offset,
        "end_marker": members[-1].offset_data + members[-1].size,
    }[cut]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[:length])
    expected = rf"shard {re.escape(str(broken))} is truncated or corrupt .* delete it and re-run"
    with pytest.raises(CorruptShardError, match=expected):
        ShardStream([shards[1], broken], seed=0)


def test_garbage_inside_a_shard_is_reported(shards, tmp_path):
    data = bytearray(shards[0].read_bytes())
    with tarfile.open(shards[0]) as tar:
        header = tar.getmembers()[2].offset
    data[header : header + 100] = b"\xff" * 100
    broken = tmp_path / "garbage.tar"
    broken.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="garbage.tar"):
        ShardStream([broken], seed=0)


def test_a_shard_refuses_an_image_changed_since_its_proposals(tmp_path):
    image = tmp_path / "imgs" / "a.jpg"
    image.parent.mkdir()
    Image.new("RGB", (64, 48)).save(image)
    write_image_list(list_images("folder", image.parent), tmp_path / "list.tsv")
    run_chunk(tmp_path / "list.tsv", 0, 1, tmp_path / "a.parquet", tmp_path / "a.json", SETTINGS)
    Image.new("RGB", (10, 10)).save(image)
    with pytest.raises(RuntimeError, match=r"proposals were computed on 64x48 px; re-run the proposals"):
        write_shard(tmp_path / "a.parquet", tmp_path / "stale.tar")
    assert not (tmp_path / "stale.tar").exists()


def test_decoded_cmyk_sample_matches_the_proposal_stage_decoding(shards):
    stream = ShardStream(shards, seed=0)
    sample = next(s for s in stream if s["key"] == "img03")
    source = Image.open(io.BytesIO(Path(shards[0].parent / "imgs" / "img03.jpg").read_bytes())).convert("RGB")
    assert np.array_equal(np.asarray(sample["image"]), np.asarray(source))


def rank_keys(shards: list[Path], epoch: int, rank: int, skip: int, num_workers: int) -> list[str]:
    stream = ShardStream(shards, seed=7, rank=rank, world_size=2)
    stream.set_epoch(epoch, skip=skip)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [sample["key"] for sample in loader]


# 3 workers on 2 cores: torch warns, but unequal worker shares are the point of that case.
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_skipping_n_samples_resumes_exactly_where_an_uninterrupted_epoch_would_be(shards, num_workers):
    for rank in range(2):
        full = rank_keys(shards, epoch=2, rank=rank, skip=0, num_workers=0)
        for skip in (1, 2, 5, len(full)):
            assert rank_keys(shards, epoch=2, rank=rank, skip=skip, num_workers=num_workers) == full[skip:]


class CountingStream(ShardStream):
    """A ShardStream that records which samples it decoded."""

    def load(self, sample: int) -> dict:
        self.loaded.append(sample)
        return super().load(sample)


def test_skipped_samples_are_never_read_and_skip_lasts_one_epoch(shards):
    stream = CountingStream(shards, seed=7, rank=1, world_size=2)
    stream.loaded = []
    stream.set_epoch(4, skip=3)
    keys = [sample["key"] for sample in stream]
    assert len(stream.loaded) == len(keys) == stream.samples_per_rank - 3 == 6 - 3
    stream.set_epoch(5)
    assert len(list(stream)) == stream.samples_per_rank


def test_skip_beyond_the_rank_share_is_refused(shards):
    stream = ShardStream(shards, seed=0, rank=0, world_size=2)
    assert stream.samples_per_rank == 7  # 13 samples over 2 ranks: rank 0 gets the extra one
    with pytest.raises(ValueError, match=r"skip must be in \[0, 7\]"):
        stream.set_epoch(0, skip=8)
