"""Dataset layout checks: cheap, before any job, naming the path and the expected layout."""

import shutil
from pathlib import Path

import pytest

from regioncl.data.layouts import DatasetLayoutError, DatasetSpec

FIXTURE_DATASETS = Path(__file__).parent / "fixtures" / "datasets"


@pytest.mark.parametrize("layout", ["imagenet", "coco", "voc", "cityscapes", "lvis"])
def test_fixture_tree_has_the_real_layouts(layout):
    DatasetSpec(name=layout, layout=layout, root=FIXTURE_DATASETS / layout).check()


def test_missing_root_names_the_path_and_layout(tmp_path):
    spec = DatasetSpec(name="imagenet", layout="imagenet", root=tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match=r"nowhere.*does not exist.*train/<wnid>"):
        spec.check()


def test_missing_coco_annotation_is_named(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(FIXTURE_DATASETS / "coco", root)
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DatasetLayoutError, match=r"instances_val2017\.json is missing"):
        DatasetSpec(name="coco", layout="coco", root=root).check()


def test_malformed_coco_annotation_is_named(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(FIXTURE_DATASETS / "coco", root)
    (root / "annotations" / "instances_train2017.json").write_text("<html>not json</html>")
    with pytest.raises(DatasetLayoutError, match=r"instances_train2017\.json is malformed"):
        DatasetSpec(name="coco", layout="coco", root=root).check()


def test_truncated_coco_annotation_is_named_before_any_job(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(FIXTURE_DATASETS / "coco", root)
    annotations = root / "annotations" / "instances_train2017.json"
    annotations.write_text(annotations.read_text()[:-10])  # starts like JSON, a download cut short
    with pytest.raises(DatasetLayoutError, match=r"instances_train2017\.json is malformed \(invalid JSON at line \d+"):
        DatasetSpec(name="coco", layout="coco", root=root).check()


def test_a_filelist_root_is_a_list_file(tmp_path):
    listfile = tmp_path / "images.txt"
    listfile.write_text("a.jpg\n")
    DatasetSpec(name="mine", layout="filelist", root=listfile).check()
    with pytest.raises(DatasetLayoutError, match=rf"root: {tmp_path} does not exist or is not a file"):
        DatasetSpec(name="mine", layout="filelist", root=tmp_path).check()


def test_unknown_layout_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"unknown layout 'kitti'.*imagenet.*voc"):
        DatasetSpec(name="x", layout="kitti", root=tmp_path).check()


def _copy_fixture(layout: str, tmp_path: Path) -> Path:
    root = tmp_path / layout
    shutil.copytree(FIXTURE_DATASETS / layout, root)
    return root


def test_missing_voc2012_image_set_list_is_named(tmp_path):
    root = _copy_fixture("voc", tmp_path)
    (root / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"image-set list .*VOC2012/ImageSets/Main/trainval\.txt is missing.*'voc'"):
        DatasetSpec(name="voc", layout="voc", root=root).check()


def test_empty_voc_test_list_is_named(tmp_path):
    root = _copy_fixture("voc", tmp_path)
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("")
    with pytest.raises(DatasetLayoutError, match=r"VOC2007/ImageSets/Main/test\.txt is missing or empty"):
        DatasetSpec(name="voc", layout="voc", root=root).check()


def test_voc_without_jpeg_images_is_named(tmp_path):
    root = _copy_fixture("voc", tmp_path)
    shutil.rmtree(root / "VOC2007" / "JPEGImages")
    with pytest.raises(DatasetLayoutError, match=r"VOC2007/JPEGImages is missing or empty; expected layout 'voc'"):
        DatasetSpec(name="voc", layout="voc", root=root).check()


def test_cityscapes_without_fine_val_annotations_is_named(tmp_path):
    root = _copy_fixture("cityscapes", tmp_path)
    shutil.rmtree(root / "gtFine" / "val")
    with pytest.raises(DatasetLayoutError, match=r"gtFine/val is missing or empty.*leftImg8bit"):
        DatasetSpec(name="cityscapes", layout="cityscapes", root=root).check()


def test_lvis_without_its_annotations_is_named(tmp_path):
    root = _copy_fixture("lvis", tmp_path)
    (root / "lvis" / "lvis_v1_val.json").unlink()
    with pytest.raises(DatasetLayoutError, match=r"lvis/lvis_v1_val\.json is missing.*ROOT/coco"):
        DatasetSpec(name="lvis", layout="lvis", root=root).check()


def test_lvis_without_coco_images_is_named(tmp_path):
    root = _copy_fixture("lvis", tmp_path)
    shutil.rmtree(root / "coco" / "val2017")
    with pytest.raises(DatasetLayoutError, match=r"coco/val2017 is missing or empty"):
        DatasetSpec(name="lvis", layout="lvis", root=root).check()
