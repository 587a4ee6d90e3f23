"""Dataset layout checks: cheap, before any job, naming the path and the expected layout."""

import shutil
from pathlib import Path

import pytest

from regioncl.data.layouts import DatasetLayoutError, DatasetSpec

FIXTURE_DATASETS = Path(__file__).parent / "fixtures" / "datasets"


@pytest.mark.parametrize("layout", ["imagenet", "coco"])
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


def test_unknown_layout_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"unknown layout 'voc'.*imagenet"):
        DatasetSpec(name="x", layout="voc", root=tmp_path).check()
