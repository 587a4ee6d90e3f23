"""Loading converted weights: detectron2's name matching and the rules both backends refuse a
partial load by, on key -> shape mappings (no detectron2 needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regioncl.transfer.loading import (
    check_loadable,
    detectron2_load_check,
    detectron2_matches,
    load_problems,
    report_left_out,
    shapes_of,
)

# A detectron2 R-CNN's keys as its FPN models name them, with a basic-block ResNet cut to two
# blocks (the rules see names, not depth); the weights are the converted .d2.pkl's names.
STEM = {"stem.conv1.weight": (64, 3, 7, 7), **{f"stem.conv1.norm.{p}": (64,) for p in ("weight", "bias", "running_mean", "running_var")}}
RES = {f"res{stage}.0.conv1.weight": (64, 64, 3, 3) for stage in (2, 3, 4, 5)}
FPN = {f"fpn_{kind}{level}.weight": (32, 64, 1, 1) for kind in ("lateral", "output") for level in (2, 3, 4, 5)}
HEADS = {
    "proposal_generator.rpn_head.conv.weight": (32, 32, 3, 3),
    "roi_heads.box_head.fc1.weight": (64, 1568),
    "roi_heads.box_predictor.cls_score.weight": (2, 64),
}


def fpn_model(fpn_levels=(2, 3, 4, 5)) -> dict[str, tuple[int, ...]]:
    backbone = {f"backbone.bottom_up.{k}": v for k, v in {**STEM, **RES}.items()}
    fpn = {f"backbone.{k}": v for k, v in FPN.items() if int(k.split(".")[0][-1]) in fpn_levels}
    return {**backbone, "backbone.bottom_up.stem.conv1.norm.num_batches_tracked": (), **fpn, **HEADS}


def test_matching_takes_the_longest_suffix_after_a_dot():
    model = ["backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.res2.0.conv1.weight", "head.xconv1.weight"]
    weights = ["conv1.weight", "stem.conv1.weight", "res2.0.conv1.weight"]
    assert detectron2_matches(model, weights) == {
        "backbone.bottom_up.stem.conv1.weight": "stem.conv1.weight",
        "backbone.bottom_up.res2.0.conv1.weight": "res2.0.conv1.weight",
    }  # "xconv1.weight" does not end in ".conv1.weight"


def test_a_backbone_and_fpn_fill_the_detector_whose_heads_are_expected_missing():
    weights = {**STEM, **RES, **FPN}
    assert detectron2_load_check(fpn_model(), weights) == ([], [])


def test_the_c4_res5_head_takes_res5_and_keeps_its_own_extra_norm():
    c4 = {f"backbone.{k}": v for k, v in {**STEM, **RES}.items() if not k.startswith("res5")}
    c4 |= {"roi_heads.res5.0.conv1.weight": (64, 64, 3, 3), "roi_heads.res5.norm.weight": (64,), **HEADS}
    assert detectron2_load_check(c4, {**STEM, **RES}) == ([], [])


def test_a_missing_backbone_tensor_is_a_problem_named_by_the_model_key():
    weights = {k: v for k, v in {**STEM, **RES}.items() if k != "res4.0.conv1.weight"}
    problems, _ = detectron2_load_check(fpn_model(), weights)
    assert problems == ["missing backbone key backbone.bottom_up.res4.0.conv1.weight"]


def test_a_tensor_without_a_place_or_of_another_shape_is_a_problem():
    weights = {**STEM, **RES, "box_head.conv1.norm.weight": (32,), "res2.0.conv1.weight": (64, 64, 1, 1)}
    problems, left_out = detectron2_load_check(fpn_model(), weights)
    assert problems == [
        "unexpected key box_head.conv1.norm.weight",
        "backbone.bottom_up.res2.0.conv1.weight: shape (64, 64, 1, 1), the model has (64, 64, 3, 3)",
    ]
    assert left_out == []


def test_a_weights_key_matching_two_places_is_a_problem():
    model = {"backbone.bottom_up.stem.conv1.weight": (8,), "roi_heads.box_head.conv1.weight": (8,)}
    problems, _ = detectron2_load_check(model, {"conv1.weight": (8,)})
    assert problems[0] == (
        "ambiguous key conv1.weight: matches ['backbone.bottom_up.stem.conv1.weight', 'roi_heads.box_head.conv1.weight']"
    )


def test_fpn_levels_the_detector_lacks_are_left_out_not_unexpected():
    """RetinaNet's FPN starts at C3; the converted FPN at C2."""
    problems, left_out = detectron2_load_check(fpn_model(fpn_levels=(3, 4, 5)), {**STEM, **RES, **FPN})
    assert problems == []
    assert left_out == ["fpn_lateral2.weight", "fpn_output2.weight"]


def test_load_problems_require_only_the_required_keys():
    expected = {"backbone.body.conv1.weight": (4, 3), "rpn.head.weight": (2,)}
    assert load_problems({"backbone.body.conv1.weight": (4, 3)}, expected, ["backbone.body.conv1.weight"]) == []
    assert load_problems({}, expected, ["backbone.body.conv1.weight"]) == [
        "missing backbone key backbone.body.conv1.weight"
    ]


def test_shapes_of_reads_torch_and_numpy_alike():
    state = {"a": torch.zeros(2, 3), "b": np.zeros((4,), dtype=np.float32)}
    assert shapes_of(state) == {"a": (2, 3), "b": (4,)}


def test_problems_raise_naming_the_file_and_every_key(tmp_path):
    check_loadable(tmp_path / "w.d2.pkl", [])
    with pytest.raises(ValueError, match=r"(?s)w\.d2\.pkl: cannot load into the detector:\n  missing .*\n  unexpected"):
        check_loadable(tmp_path / "w.d2.pkl", ["missing backbone key a", "unexpected key b"])


def test_left_out_modules_are_counted_on_stderr(tmp_path, capsys):
    report_left_out(tmp_path / "w.d2.pkl", "voc", ["fpn_lateral2.weight", "fpn_output2.weight", "box_head.fc1.bias"], "detectron2")
    err = capsys.readouterr().err
    assert err.strip().endswith("w.d2.pkl: left out of voc's detector: box_head (1 tensors), fpn (2 tensors)")
    report_left_out(tmp_path / "w.d2.pkl", "voc", [], "detectron2")
    assert capsys.readouterr().err == ""
