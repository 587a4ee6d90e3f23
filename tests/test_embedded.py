"""The embedded dataset generator: determinism, COCO validity, content and settings."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from regioncl.data.embedded import OBJECT_CLASSES, EmbeddedSettings, generate_embedded

SMALL = EmbeddedSettings(seed=3, n_unlabeled=6, n_train=4, n_val=3)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embedded")
    generate_embedded(out, SMALL)
    return out


@pytest.fixture(scope="module")
def labeled_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough labeled images for statistics over classes and objects."""
    out = tmp_path_factory.mktemp("embedded_sample")
    generate_embedded(out, EmbeddedSettings(seed=11, n_unlabeled=0, n_train=24, n_val=0))
    return out


def test_writes_the_documented_layout(small_dataset: Path) -> None:
    files = set(all_files(small_dataset))
    expected = (
        {f"unlabeled/unl_{i:06d}.jpg" for i in range(6)}
        | {f"train/train_{i:06d}.jpg" for i in range(4)}
        | {f"val/val_{i:06d}.jpg" for i in range(3)}
        | {"annotations/instances_train.json", "annotations/instances_val.json", "dataset.json"}
    )
    assert files == expected
    assert all("." not in Path(name).stem for name in files if name.endswith(".jpg"))


def test_no_temporary_files_are_left_behind(small_dataset: Path) -> None:
    leftovers = [p for p in small_dataset.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_same_settings_give_byte_identical_files(small_dataset: Path, tmp_path: Path) -> None:
    generate_embedded(tmp_path, SMALL)
    assert all_files(tmp_path) == all_files(small_dataset)


def test_first_images_do_not_depend_on_how_many_are_generated(small_dataset: Path, tmp_path: Path) -> None:
    fewer = EmbeddedSettings(seed=SMALL.seed, n_unlabeled=2, n_train=2, n_val=1)
    generate_embedded(tmp_path, fewer)
    big, small = all_files(small_dataset), all_files(tmp_path)
    for name, data in small.items():
        if name.endswith(".jpg"):
            assert data == big[name], name
    for split in ("train", "val"):
        prefix = json.loads(small[f"annotations/instances_{split}.json"])
        full = json.loads(big[f"annotations/instances_{split}.json"])
        assert prefix["images"] == full["images"][: len(prefix["images"])]
        assert prefix["annotations"] == full["annotations"][: len(prefix["annotations"])]


def test_splits_and_seeds_give_different_images(small_dataset: Path, tmp_path: Path) -> None:
    firsts = {
        (small_dataset / name).read_bytes()
        for name in ("unlabeled/unl_000000.jpg", "train/train_000000.jpg", "val/val_000000.jpg")
    }
    assert len(firsts) == 3
    generate_embedded(tmp_path, EmbeddedSettings(seed=SMALL.seed + 1, n_unlabeled=1, n_train=0, n_val=0))
    assert (tmp_path / "unlabeled/unl_000000.jpg").read_bytes() != (small_dataset / "unlabeled/unl_000000.jpg").read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_boxes_and_areas_are_those_of_the_visible_masks(small_dataset: Path, split: str) -> None:
    coco = COCO(str(small_dataset / "annotations" / f"instances_{split}.json"))
    category_ids = {c.category_id for c in OBJECT_CLASSES}
    assert set(coco.getCatIds()) == category_ids
    assert coco.getAnnIds(), "no annotations"
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = cv2.imread(str(small_dataset / split / info["file_name"]))
        assert pixels.shape[:2] == (info["height"], info["width"])
        assert max(pixels.shape[:2]) == SMALL.image_size
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann).astype(bool)
        ys, xs = np.nonzero(mask)
        tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == [float(v) for v in tight]
        assert ann["area"] == int(mask.sum()) >= SMALL.min_visible_pixels
        assert ann["category_id"] in category_ids
        assert ann["iscrowd"] == 0


def test_visible_masks_of_one_image_do_not_overlap(small_dataset: Path) -> None:
    coco = COCO(str(small_dataset / "annotations" / "instances_train.json"))
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() <= 1


def test_labeled_images_hold_several_objects_of_every_class(labeled_sample: Path) -> None:
    coco = json.loads((labeled_sample / "annotations" / "instances_train.json").read_text())
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert len(coco["annotations"]) / len(coco["images"]) >= 2
    assert all(per_image[image["id"]] >= 1 for image in coco["images"])
    assert set(Counter(a["category_id"] for a in coco["annotations"])) == {c.category_id for c in OBJECT_CLASSES}
    sides = [max(a["bbox"][2:]) for a in coco["annotations"]]
    assert min(sides) < 32 and max(sides) > 80  # small and large objects


def test_backgrounds_are_textured_not_flat(labeled_sample: Path) -> None:
    coco = COCO(str(labeled_sample / "annotations" / "instances_train.json"))
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        grey = cv2.imread(str(labeled_sample / "train" / info["file_name"]), cv2.IMREAD_GRAYSCALE)
        objects = np.zeros(grey.shape, bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            objects |= coco.annToMask(ann).astype(bool)
        # Blurred first so that sensor noise alone cannot pass: a flat colour plus the generator's
        # strongest noise scores below 1 here, the smoothest photo backgrounds about 7.
        smooth = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 2)
        assert smooth[~objects].std() > 4, info["file_name"]


def test_dataset_json_records_settings_and_version_and_reads_back(small_dataset: Path) -> None:
    recorded = json.loads((small_dataset / "dataset.json").read_text())
    assert recorded["version"] == EmbeddedSettings.version
    assert EmbeddedSettings.from_dict(recorded) == SMALL


def test_settings_round_trip_through_a_dict() -> None:
    settings = EmbeddedSettings(seed=5, n_train=7, max_object_fraction=0.5)
    assert EmbeddedSettings.from_dict(settings.to_dict()) == settings


def test_from_dict_rejects_an_unknown_key_by_name() -> None:
    with pytest.raises(ValueError, match="n_trian"):
        EmbeddedSettings.from_dict({"seed": 1, "n_trian": 10})


def test_from_dict_rejects_another_generator_version() -> None:
    with pytest.raises(ValueError, match="version"):
        EmbeddedSettings.from_dict({"version": EmbeddedSettings.version + 1})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_objects", 1, "max_objects=1"),  # below min_objects=2
        ("seed", -1, "seed=-1"),
        ("n_val", "100", "n_val must be an integer"),
        ("min_object_size", 200, "min_object_size=200"),
    ],
)
def test_invalid_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        EmbeddedSettings(**{field: value})


def test_refuses_a_directory_with_images_this_run_would_not_write(small_dataset: Path, tmp_path: Path) -> None:
    generate_embedded(tmp_path, EmbeddedSettings(n_unlabeled=2, n_train=0, n_val=0))
    with pytest.raises(FileExistsError, match="unl_000001.jpg"):
        generate_embedded(tmp_path, EmbeddedSettings(n_unlabeled=1, n_train=0, n_val=0))
