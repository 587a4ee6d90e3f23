"""The benchmark registry: every paper protocol resolves, validates and becomes the detectron2
config the specs describe, without its dataset and without detectron2."""

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regioncl.data.layouts import DatasetSpec
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.detectron2_config import (
    FORMAT_NUM_CLASSES,
    dataset_names,
    detectron2_options,
)
from regioncl.transfer.registry import RegistryError, load_registry, resolve_benchmark
from regioncl.transfer.subsets import (
    coco_subset,
    sample_image_ids,
    training_annotations,
)

REGISTRY = load_registry()
NAMES = sorted(REGISTRY)
# The detection protocols (detectron2 configs); the semantic-segmentation ones: tests/test_semseg.py.
DETECTION_NAMES = [name for name in NAMES if REGISTRY[name].settings.get("model") != "fcn"]
HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
MOCO_PIXEL_MEAN = [123.675, 116.28, 103.53]  # spec_dupr §4.1, spec_resim §4.2
MOCO_PIXEL_STD = [58.395, 57.12, 57.375]


def options_of(name: str, num_classes: int = 80) -> dict:
    benchmark = REGISTRY[name].resolve(Path("/no/dataset/needed"))
    classes = FORMAT_NUM_CLASSES.get(benchmark.dataset.format, num_classes)
    return detectron2_options(benchmark, classes)


def test_registry_holds_every_protocol_of_the_issue():
    protocols = {b.protocol for b in REGISTRY.values()}
    assert protocols == {
        "voc0712_faster_rcnn_r50_c4",
        "coco_mask_rcnn_r50_fpn",
        "coco_mask_rcnn_r50_fpn_soco",
        "coco_mask_rcnn_r50_c4",
        "coco_semi_supervised",
        "coco_retinanet_r50_fpn",
        "cityscapes_mask_rcnn_r50_fpn",
        "lvis_v1_mask_rcnn_r50_fpn",
        "lvis_v1_mask_rcnn_r50_fpn_soco",
        "cityscapes_semseg",
        "embedded_semseg",
    }
    for name in ("coco_mrcnn_r50fpn_1x", "coco_mrcnn_r50fpn_2x", "coco_mrcnn_r50c4_1x", "coco_mrcnn_r50c4_2x"):
        assert name in REGISTRY


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_resolves_and_round_trips_without_its_dataset(name):
    benchmark = REGISTRY[name].resolve(Path("/no/dataset/needed"))
    assert benchmark.protocol == name
    assert benchmark.backend == ("torchvision" if benchmark.task == "sem_seg" else "detectron2")
    assert BenchmarkSettings.from_dict(benchmark.to_dict()) == benchmark
    assert all(key and isinstance(text, str) and "spec_" in text for key, text in REGISTRY[name].sources.items())


@pytest.mark.parametrize("name", DETECTION_NAMES)
def test_every_benchmark_uses_torchvision_rgb_weights_and_trains_every_stage(name):
    options = options_of(name)
    assert options["INPUT.FORMAT"] == "RGB"
    assert options["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert options["MODEL.PIXEL_MEAN"] == MOCO_PIXEL_MEAN
    assert options["MODEL.PIXEL_STD"] == MOCO_PIXEL_STD
    assert options["MODEL.RESNETS.NORM"] == "SyncBN"
    assert options["MODEL.BACKBONE.FREEZE_AT"] == 0
    assert options["TEST.PRECISE_BN.ENABLED"] is True
    assert options["SOLVER.STEPS"][-1] < options["SOLVER.MAX_ITER"]


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed")
@pytest.mark.parametrize("name", DETECTION_NAMES)
def test_every_benchmark_builds_a_detectron2_cfgnode(name):
    from regioncl.transfer.detectron2_backend import build_cfg

    benchmark = REGISTRY[name].resolve(Path("/no/dataset/needed"))
    cfg = build_cfg(benchmark, num_classes=FORMAT_NUM_CLASSES.get(benchmark.dataset.format, 80), seed=3)
    assert cfg.SOLVER.MAX_ITER == benchmark.solver.iterations
    assert tuple(cfg.SOLVER.STEPS) == benchmark.solver.lr_steps
    assert cfg.SEED == 3


# (benchmark, detectron2 key, value the spec states)
SPEC_VALUES = [
    # MoCo's VOC protocol: spec_dupr §4.2, spec_plrc §4.2, spec_detco §4.1-4.2
    ("voc0712_frcnn_r50c4_24k", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"),
    ("voc0712_frcnn_r50c4_24k", "MODEL.MASK_ON", False),
    ("voc0712_frcnn_r50c4_24k", "MODEL.BACKBONE.NAME", "build_resnet_backbone"),
    ("voc0712_frcnn_r50c4_24k", "MODEL.ROI_HEADS.NAME", "Res5ROIHeadsExtraNorm"),
    ("voc0712_frcnn_r50c4_24k", "MODEL.ROI_HEADS.NUM_CLASSES", 20),
    ("voc0712_frcnn_r50c4_24k", "SOLVER.MAX_ITER", 24000),
    ("voc0712_frcnn_r50c4_24k", "SOLVER.STEPS", [18000, 22000]),
    ("voc0712_frcnn_r50c4_24k", "SOLVER.BASE_LR", 0.02),
    ("voc0712_frcnn_r50c4_24k", "SOLVER.IMS_PER_BATCH", 16),
    ("voc0712_frcnn_r50c4_24k", "SOLVER.WARMUP_ITERS", 100),
    ("voc0712_frcnn_r50c4_24k", "SOLVER.WEIGHT_DECAY", 1e-4),
    ("voc0712_frcnn_r50c4_24k", "INPUT.MIN_SIZE_TRAIN", list(range(480, 801, 32))),
    ("voc0712_frcnn_r50c4_24k", "INPUT.MIN_SIZE_TEST", 800),
    ("voc0712_frcnn_r50c4_24k", "INPUT.MAX_SIZE_TRAIN", 1200),
    ("voc0712_frcnn_r50c4_24k", "MODEL.RPN.PRE_NMS_TOPK_TEST", 6000),
    ("voc0712_frcnn_r50c4_24k", "MODEL.RPN.POST_NMS_TOPK_TEST", 1000),
    # MoCo's COCO FPN protocol: spec_detco §4.2, spec_dupr §4.3, spec_resim §4.2
    ("coco_mrcnn_r50fpn_1x", "MODEL.MASK_ON", True),
    ("coco_mrcnn_r50fpn_1x", "MODEL.FPN.NORM", "SyncBN"),
    ("coco_mrcnn_r50fpn_1x", "MODEL.ROI_BOX_HEAD.NUM_CONV", 0),
    ("coco_mrcnn_r50fpn_1x", "MODEL.ROI_BOX_HEAD.NUM_FC", 2),
    ("coco_mrcnn_r50fpn_1x", "MODEL.ROI_BOX_HEAD.FC_DIM", 1024),
    ("coco_mrcnn_r50fpn_1x", "SOLVER.MAX_ITER", 90000),
    ("coco_mrcnn_r50fpn_1x", "SOLVER.STEPS", [60000, 80000]),
    ("coco_mrcnn_r50fpn_1x", "SOLVER.WARMUP_ITERS", 1000),
    ("coco_mrcnn_r50fpn_1x", "INPUT.MIN_SIZE_TRAIN", list(range(640, 801, 32))),
    ("coco_mrcnn_r50fpn_1x", "INPUT.MIN_SIZE_TEST", 800),
    ("coco_mrcnn_r50fpn_1x", "INPUT.MAX_SIZE_TRAIN", 1333),
    ("coco_mrcnn_r50fpn_2x", "SOLVER.MAX_ITER", 180000),
    ("coco_mrcnn_r50fpn_2x", "SOLVER.STEPS", [120000, 160000]),
    ("coco_mrcnn_r50fpn_12k", "SOLVER.STEPS", [9000, 11000]),
    # SoCo: spec_soco §4
    ("coco_mrcnn_r50fpn_soco_1x", "MODEL.ROI_BOX_HEAD.NUM_CONV", 4),
    ("coco_mrcnn_r50fpn_soco_1x", "MODEL.ROI_BOX_HEAD.NUM_FC", 1),
    ("coco_mrcnn_r50fpn_soco_1x", "MODEL.ROI_BOX_HEAD.NORM", "SyncBN"),
    ("coco_mrcnn_r50fpn_soco_1x", "MODEL.ROI_MASK_HEAD.NORM", "SyncBN"),
    ("coco_mrcnn_r50fpn_soco_1x", "MODEL.FPN.NORM", "SyncBN"),
    ("coco_mrcnn_r50fpn_soco_1x", "SOLVER.WEIGHT_DECAY", 2.5e-5),
    ("coco_mrcnn_r50fpn_soco_1x", "SOLVER.STEPS", [60000, 80000]),
    ("coco_mrcnn_r50fpn_soco_2x", "SOLVER.STEPS", [120000, 160000]),
    # C4: spec_detco §4.1-4.2, spec_plrc §4.3
    ("coco_mrcnn_r50c4_1x", "MODEL.ROI_HEADS.NAME", "Res5ROIHeadsExtraNorm"),
    ("coco_mrcnn_r50c4_1x", "MODEL.MASK_ON", True),
    ("coco_mrcnn_r50c4_1x", "INPUT.MAX_SIZE_TRAIN", 1200),
    ("coco_mrcnn_r50c4_1x", "SOLVER.STEPS", [60000, 80000]),
    ("coco_mrcnn_r50c4_2x", "SOLVER.MAX_ITER", 180000),
    ("coco_mrcnn_r50c4_12k", "SOLVER.MAX_ITER", 12000),
    # RetinaNet: spec_detco §4.2, spec_dupr §4.3
    ("coco_retinanet_r50fpn_1x", "MODEL.META_ARCHITECTURE", "RetinaNet"),
    ("coco_retinanet_r50fpn_1x", "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"),
    ("coco_retinanet_r50fpn_1x", "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]),
    ("coco_retinanet_r50fpn_1x", "MODEL.FPN.NORM", "SyncBN"),
    ("coco_retinanet_r50fpn_1x", "MODEL.RETINANET.IOU_THRESHOLDS", [0.4, 0.5]),
    ("coco_retinanet_r50fpn_1x", "SOLVER.BASE_LR", 0.01),
    ("coco_retinanet_r50fpn_1x", "SOLVER.MAX_ITER", 90000),
    # semi-supervised: spec_detco §4.2
    ("coco1pct_mrcnn_r50fpn_12k", "SOLVER.MAX_ITER", 12000),
    ("coco10pct_mrcnn_r50fpn_12k", "SOLVER.STEPS", [9000, 11000]),
    # Cityscapes: spec_dupr §4.4
    ("cityscapes_mrcnn_r50fpn_24k", "MODEL.ROI_HEADS.NUM_CLASSES", 8),
    ("cityscapes_mrcnn_r50fpn_24k", "INPUT.MIN_SIZE_TRAIN", list(range(800, 1025, 32))),
    ("cityscapes_mrcnn_r50fpn_24k", "INPUT.MAX_SIZE_TRAIN", 2048),
    ("cityscapes_mrcnn_r50fpn_24k", "INPUT.MIN_SIZE_TEST", 1024),
    ("cityscapes_mrcnn_r50fpn_24k", "INPUT.MAX_SIZE_TEST", 2048),
    ("cityscapes_mrcnn_r50fpn_24k", "SOLVER.IMS_PER_BATCH", 8),
    ("cityscapes_mrcnn_r50fpn_24k", "SOLVER.BASE_LR", 0.01),
    ("cityscapes_mrcnn_r50fpn_24k", "SOLVER.STEPS", [18000]),
    ("cityscapes_mrcnn_r50fpn_24k", "SOLVER.MAX_ITER", 24000),
    # LVIS v1: spec_soco §4 [C], spec_detco §4.2
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "MODEL.ROI_HEADS.NUM_CLASSES", 1203),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler"),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "DATALOADER.REPEAT_THRESHOLD", 0.001),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "TEST.DETECTIONS_PER_IMAGE", 300),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1e-4),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "MODEL.ROI_BOX_HEAD.NUM_CONV", 4),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "SOLVER.MAX_ITER", 180000),
    ("lvis_v1_mrcnn_r50fpn_soco_1x", "SOLVER.STEPS", [120000, 160000]),
    ("lvis_v1_mrcnn_r50fpn_1x", "MODEL.ROI_BOX_HEAD.NUM_FC", 2),
    ("lvis_v1_mrcnn_r50fpn_1x", "SOLVER.MAX_ITER", 180000),
]


@pytest.mark.parametrize(("name", "key", "expected"), SPEC_VALUES)
def test_detectron2_options_match_the_specs(name, key, expected):
    assert options_of(name)[key] == pytest.approx(expected)


def test_voc_is_averaged_over_five_seeds_and_trains_on_07_plus_12():
    registered = REGISTRY["voc0712_frcnn_r50c4_24k"]
    assert registered.seeds == (0, 1, 2, 3, 4)
    benchmark = registered.resolve(Path("/voc"))
    splits = benchmark.dataset.train_splits()
    assert [str(a) for a, _ in splits] == [
        "/voc/VOC2007/ImageSets/Main/trainval.txt",
        "/voc/VOC2012/ImageSets/Main/trainval.txt",
    ]
    assert benchmark.dataset.path("val_json") == Path("/voc/VOC2007/ImageSets/Main/test.txt")
    assert dataset_names(benchmark)[0] == (
        "regioncl_voc0712_frcnn_r50c4_24k_train0",
        "regioncl_voc0712_frcnn_r50c4_24k_train1",
    )


def test_semi_supervised_fractions():
    fractions = {n: REGISTRY[n].resolve(Path("/coco")).train_fraction for n in NAMES if "pct_" in n}
    assert fractions == {
        "coco1pct_mrcnn_r50fpn_12k": 0.01,
        "coco5pct_mrcnn_r50fpn_12k": 0.05,
        "coco10pct_mrcnn_r50fpn_12k": 0.10,
    }


def test_config_entry_overrides_one_nested_key_and_keeps_the_rest():
    spec = DatasetSpec(name="coco", layout="coco", root=Path("/coco"))
    entry = {"protocol": "coco_mrcnn_r50fpn_1x", "solver": {"iterations": 100, "lr_steps": [80]}}
    resolved = BenchmarkSettings.from_dict(resolve_benchmark("mine", entry, spec))
    assert resolved.name == "mine" and resolved.protocol == "coco_mrcnn_r50fpn_1x"
    assert (resolved.solver.iterations, resolved.solver.lr_steps) == (100, (80,))
    assert resolved.solver.lr == 0.02 and resolved.fpn_norm == "syncbn"


def test_protocol_on_the_wrong_layout_names_the_layouts():
    spec = DatasetSpec(name="coco", layout="coco", root=Path("/coco"))
    with pytest.raises(RegistryError, match=r"benchmarks\.x\.dataset.*\['voc'\].*'coco'"):
        resolve_benchmark("x", {"protocol": "voc0712_frcnn_r50c4_24k"}, spec)


def test_unknown_protocol_lists_the_registered_ones():
    spec = DatasetSpec(name="coco", layout="coco", root=Path("/coco"))
    with pytest.raises(RegistryError, match=r"benchmarks\.x\.protocol: 'nope'.*coco_mrcnn_r50fpn_1x"):
        resolve_benchmark("x", {"protocol": "nope"}, spec)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"sampler": "repeat_factor"}, "sampler"),
        ({"model": "retinanet", "input": {"min_size_sampling": "range", "min_size": [640, 800]}}, "input.min_size_sampling"),
        ({"fpn": False, "arch": "resnet50"}, "fpn"),
        ({"precise_bn": True}, "precise_bn"),
        ({"input": {"min_size_test": 600}}, "input.min_size_test"),
    ],
)
def test_torchvision_backend_rejects_what_it_cannot_build_by_name(override, named):
    data = {"name": "b", "dataset": {"root": "/d"}, "backend": "torchvision", "arch": "resnet18", **override}
    with pytest.raises(ValueError, match=rf"{named}: .*needs backend 'detectron2'"):
        BenchmarkSettings.from_dict(data)


def test_c4_needs_bottleneck_resnets():
    data = {"name": "b", "dataset": {"root": "/d"}, "backend": "detectron2", "fpn": False, "arch": "resnet18"}
    with pytest.raises(ValueError, match=r"arch: 'resnet18' has basic blocks"):
        BenchmarkSettings.from_dict(data)


def _write_protocol(directory: Path, stem: str, **fields) -> None:
    data = {"protocol": stem, "layouts": ["coco"], "seeds": [0], "sources": {"x": "spec_x"}, "settings": {}}
    data.update(fields)
    (directory / f"{stem}.yaml").write_text(json.dumps(data))  # JSON is YAML


def test_registry_rejects_a_variant_defined_twice(tmp_path):
    _write_protocol(tmp_path, "a", variants={"same": {}})
    _write_protocol(tmp_path, "b", variants={"same": {}})
    with pytest.raises(RegistryError, match=r"b\.yaml: benchmark 'same' is also defined in .*a\.yaml"):
        load_registry(tmp_path)


def test_registry_rejects_an_extends_cycle(tmp_path):
    _write_protocol(tmp_path, "a", extends="b", variants={"va": {}})
    _write_protocol(tmp_path, "b", extends="a", variants={"vb": {}})
    with pytest.raises(RegistryError, match=r"cycle a -> b -> a"):
        load_registry(tmp_path)


def test_registry_rejects_a_protocol_not_named_like_its_file(tmp_path):
    _write_protocol(tmp_path, "a", variants={"v": {}})
    (tmp_path / "renamed.yaml").write_text((tmp_path / "a.yaml").read_text())
    with pytest.raises(RegistryError, match=r"renamed\.yaml: protocol 'a' must equal the file name 'renamed'"):
        load_registry(tmp_path)


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, 10_000), min_size=1, max_size=300, unique=True),
    fraction=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_subset_is_deterministic_sorted_and_sized(ids, fraction, seed):
    chosen = sample_image_ids(ids, fraction, seed)
    assert chosen == sample_image_ids(list(reversed(ids)), fraction, seed)
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(ids)
    assert len(chosen) == max(1, round(fraction * len(ids)))


def test_subset_keeps_whole_images_with_all_their_annotations(tmp_path):
    instances = {
        "images": [{"id": i} for i in range(1, 101)],
        "annotations": [{"id": 10 * i + k, "image_id": i} for i in range(1, 101) for k in range(3)],
        "categories": [{"id": 1, "name": "thing"}],
    }
    subset = coco_subset(instances, 0.1, seed=7)
    kept = {image["id"] for image in subset["images"]}
    assert len(kept) == 10 and subset["categories"] == instances["categories"]
    assert sorted(a["image_id"] for a in subset["annotations"]) == sorted(3 * list(kept))
    source = tmp_path / "train.json"
    source.write_text(json.dumps(instances))
    written = training_annotations(source, 0.1, 7, tmp_path / "work")
    assert json.loads(written.read_text()) == subset
    assert training_annotations(source, 1.0, 7, tmp_path / "work") == source


def test_paper_protocol_runs_on_torchvision_only_when_the_approximation_is_explicit():
    spec = DatasetSpec(name="coco", layout="coco", root=Path("/coco"))
    entry = {"protocol": "coco_mrcnn_r50fpn_1x", "backend": "torchvision"}
    with pytest.raises(ValueError, match=r"precise_bn: True needs backend 'detectron2'"):
        BenchmarkSettings.from_dict(resolve_benchmark("x", entry, spec))
    explicit = {**entry, "precise_bn": False}  # its SyncBN FPN and 2fc head the torchvision backend builds
    resolved = BenchmarkSettings.from_dict(resolve_benchmark("x", explicit, spec))
    assert resolved.backend == "torchvision" and resolved.solver.iterations == 90000


def test_registered_seeds_follow_the_protocol():
    from regioncl.transfer.registry import registered_seeds

    spec = DatasetSpec(name="voc", layout="voc", root=Path("/voc"))
    assert registered_seeds(resolve_benchmark("v", {"protocol": "voc0712_frcnn_r50c4_24k"}, spec)) == (0, 1, 2, 3, 4)
    assert registered_seeds({"name": "plain", "protocol": ""}) is None


def test_default_device_stays_out_of_the_resolved_settings():
    """`device` says where a protocol runs, not what it is: while it is the default, the
    resolved settings (the workflow's job parameters) are those of earlier versions."""
    base = {"name": "b", "dataset": {"root": "/d"}, "arch": "resnet18"}
    assert "device" not in BenchmarkSettings.from_dict(base).to_dict()
    chosen = BenchmarkSettings.from_dict({**base, "device": "cpu"}).to_dict()
    assert chosen["device"] == "cpu"
    assert BenchmarkSettings.from_dict(chosen).device == "cpu"
