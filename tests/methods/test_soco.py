"""SoCo: views and boxes across views, the paper's loss recomputed by hand, masks, transfer, and runs."""

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import webdataset as wds
from PIL import Image
from torch.nn import functional as F

from regioncl.convert import convert_checkpoint, has_fpn_norm, module_of, select_modules
from regioncl.engine import PretrainSettings, pretrain
from regioncl.geometry import View, map_boxes
from regioncl.methods import StepInfo, get_method
from regioncl.methods.soco import LEVELS, FpnObjectEncoder, Soco, SocoC4, SocoC4Params, SocoParams
from regioncl.models import ConvFCBoxHead
from regioncl.models.roi import assign_levels
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.torchvision_backend import build_detector, load_pretrained_weights
from regioncl.weights import read_detectron2_weights, write_pretrained_checkpoint

from pretrain_runs import converted_weights_finetune, spawn_two_ranks, stopped_and_resumed_run_equals_straight_run  # tests/pretrain_runs.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TINY = {"view_size": 64, "hidden_dim": 32, "feature_dim": 16}
TINY_FPN = {**TINY, "small_view_size": 32, "star_view_size": 48, "fpn_channels": 16, "head_dim": 32}
STEP = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, seed=0)


def _method(variant: str = "soco", **overrides) -> Soco | SocoC4:
    torch.manual_seed(0)
    cls = get_method(variant)
    return cls(cls.Params(**{**(TINY_FPN if variant == "soco" else TINY), **overrides}), arch="resnet18")


def _proposals(rng: np.random.Generator, width: int, height: int, count: int = 16, sides=(0.12, 0.3)) -> np.ndarray:
    """(count, 4) source px boxes of ``sides`` of the image's (default: several fit in any half-area crop)."""
    w = rng.uniform(*sides, count) * width
    h = rng.uniform(*sides, count) * height
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def _sample(seed: int, width: int = 80, height: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return {"key": f"k{seed}", "image": image, "boxes": _proposals(rng, width, height), "width": width, "height": height}


def _batch(method, size: int = 3, seed: int = 0) -> dict:
    return method.collate([method.make_views(_sample(seed + i), np.random.default_rng(seed + i)) for i in range(size)])


# -- registry and parameters ----------------------------------------------------------------------


def test_registry_names_both_variants_with_the_papers_defaults():
    assert get_method("soco") is Soco and get_method("soco_c4") is SocoC4
    fpn = SocoParams()
    assert (fpn.view_size, fpn.small_view_size, fpn.star, fpn.star_view_size) == (224, 112, False, 192)
    assert (fpn.crop_scale, fpn.num_boxes, fpn.jitter_ratio, fpn.jitter_probability) == ((0.5, 1.0), 4, 0.1, 0.5)
    assert (fpn.hidden_dim, fpn.feature_dim, fpn.base_momentum) == (4096, 256, 0.99)
    assert (fpn.roi_size, fpn.fpn_channels, fpn.head_dim, fpn.fpn_norm, fpn.head_norm) == (7, 256, 1024, "bn", "bn")
    assert (fpn.box_visibility, fpn.small_view, fpn.jitter_style, fpn.roi_levels) == ("inside", "downsample", "center", "assigned")
    assert SocoC4Params().roi_size == 14 and not hasattr(SocoC4Params(), "small_view_size")
    # SoCo* is an option of soco: one more view, V4, at 192 px
    star = Soco.scaled_params(SocoParams(star=True), 64 / 224)
    assert (star.view_size, star.small_view_size, star.star_view_size) == (64, 32, 55)


def test_heads_are_byols_and_the_target_is_an_ema_copy_without_predictor():
    method = _method()
    assert [type(m).__name__ for m in method.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert method.projector[0].in_features == 32  # the box head's fc output
    assert {id(t) for _, t in method.momentum_pairs()} == {id(method.encoder_target), id(method.projector_target)}
    assert all(not p.requires_grad for p in method.encoder_target.parameters())
    assert [type(m).__name__ for m in (method.encoder.fpn, method.encoder.box_head)] == ["FPN", "ConvFCBoxHead"]
    tau = [method.momentum_at(StepInfo(k, 0, 4, 4, 0)) for k in (0, 2, 4)]
    assert tau == pytest.approx([0.99, 0.995, 1.0])  # BYOL's cosine from tau_base to 1
    assert _method("soco_c4").projector[0].in_features == 512  # res5 of R18, pooled


# -- geometry ---------------------------------------------------------------------------------------


def _assert_same_source(actual: np.ndarray, expected: np.ndarray, width: int, height: int) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * max(width, height))


@pytest.mark.parametrize("small_view", ["downsample", "independent"])
def test_every_matched_box_maps_from_each_view_back_to_the_same_source_box(small_view):
    method = _method(star=True, small_view=small_view, jitter_probability=0.0)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        width, height = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        sample = {"image": Image.new("RGB", (width, height)), "boxes": _proposals(rng, width, height)}
        geometry = method.draw_geometry(sample, np.random.default_rng(seed))
        source = View.identity(width, height)
        assert list(geometry.views) == ["view1", "view2", "view3", "view4"]
        # the K proposals are rows of the sample's, drawn among those inside V2, and each is in V1 and V2
        assert all(any(np.allclose(box, row) for row in sample["boxes"]) for box in geometry.source_boxes)
        assert geometry.visible["view1"].all() and geometry.visible["view2"].all()
        for name, view in geometry.views.items():
            visible = geometry.visible[name]
            back = map_boxes(geometry.boxes[name][visible], view, source)
            _assert_same_source(back, geometry.source_boxes[visible], width, height)
        if small_view == "downsample":  # V3 is V2 at 32 px: same crop, its own flip, same boxes
            assert geometry.views["view3"].crop == geometry.views["view2"].crop and geometry.views["view3"].out_w == 32
            assert geometry.visible["view3"].all()
        v2 = geometry.views["view2"].crop
        assert 0.5 - 0.05 <= (v2[2] - v2[0]) * (v2[3] - v2[1]) / (width * height) <= 1.0  # a crop of V1, area [0.5, 1]


def test_overlap_visibility_clips_each_views_copy_to_that_view():
    method = _method(box_visibility="overlap", jitter_probability=0.0)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sample = {"image": Image.new("RGB", (120, 90)), "boxes": _proposals(rng, 120, 90, sides=(0.3, 0.8))}  # often cut
        geometry = method.draw_geometry(sample, np.random.default_rng(seed))
        source = View.identity(120, 90)
        v2 = geometry.views["view2"]
        expected = geometry.source_boxes.copy()
        expected[:, [0, 2]] = expected[:, [0, 2]].clip(v2.crop[0], v2.crop[2])
        expected[:, [1, 3]] = expected[:, [1, 3]].clip(v2.crop[1], v2.crop[3])
        _assert_same_source(map_boxes(geometry.boxes["view2"], v2, source), expected, 120, 90)
        _assert_same_source(map_boxes(geometry.boxes["view1"], geometry.views["view1"], source), geometry.source_boxes, 120, 90)


def test_jitter_moves_only_v1s_copy_within_the_ratio():
    method = _method(jitter_probability=1.0)
    geometry = method.draw_geometry(_sample(3), np.random.default_rng(3))
    source = View.identity(80, 64)
    v1_back = map_boxes(geometry.boxes["view1"], geometry.views["view1"], source)
    _assert_same_source(map_boxes(geometry.boxes["view2"], geometry.views["view2"], source), geometry.source_boxes, 80, 64)
    original = geometry.source_boxes
    assert not np.allclose(v1_back, original)
    size = original[:, 2:] - original[:, :2]
    centre_shift = np.abs((v1_back[:, :2] + v1_back[:, 2:]) / 2 - (original[:, :2] + original[:, 2:]) / 2)
    assert (centre_shift <= 0.1 * size + 1e-6).all()  # clipping to the image can only pull it back


def test_without_a_visible_proposal_the_box_is_v2s_crop_in_every_view():
    method = _method()
    geometry = method.draw_geometry({"image": Image.new("RGB", (80, 64)), "boxes": np.zeros((0, 4))}, np.random.default_rng(0))
    v2 = geometry.views["view2"]
    np.testing.assert_allclose(geometry.source_boxes, np.repeat([v2.crop], 4, axis=0))
    np.testing.assert_allclose(geometry.boxes["view2"], np.repeat([[0, 0, 64, 64]], 4, axis=0), atol=1e-9)
    np.testing.assert_allclose(geometry.boxes["view3"], np.repeat([[0, 0, 32, 32]], 4, axis=0), atol=1e-9)


def test_make_views_renders_the_drawn_geometry_and_is_determined_by_the_rng():
    method = _method(star=True)
    sample = _sample(5)
    views = method.make_views(sample, np.random.default_rng(7))
    again = method.make_views(sample, np.random.default_rng(7))
    geometry = method.draw_geometry(sample, np.random.default_rng(7))  # the first draws of make_views
    assert {name: tuple(views[name].shape) for name in ("view1", "view2", "view3", "view4")} == {
        "view1": (3, 64, 64), "view2": (3, 64, 64), "view3": (3, 32, 32), "view4": (3, 48, 48),
    }
    for name in geometry.views:
        assert torch.equal(views[name], again[name])
        np.testing.assert_allclose(views[f"{name}_boxes"].numpy(), geometry.boxes[name], rtol=1e-6)
        assert views[f"{name}_visible"].tolist() == geometry.visible[name].tolist()
    assert set(_method("soco_c4").make_views(sample, np.random.default_rng(7))) == {
        "view1", "view1_boxes", "view1_visible", "view2", "view2_boxes", "view2_visible",
    }


def test_scale_aware_levels_follow_the_papers_thresholds_and_v3_lands_a_level_lower():
    encoder = FpnObjectEncoder("resnet18", SocoParams(fpn_channels=16, head_dim=32))  # 224-px views
    sides = torch.tensor([1.0, 48.0, 49.0, 96.0, 97.0, 192.0, 193.0, 224.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], dim=1)[None]  # (1, 8, 4)
    levels = assign_levels(boxes, LEVELS, canonical_size=encoder.canonical_size, rounding="ceil")
    assert levels.tolist() == [[2, 2, 3, 3, 4, 4, 5, 5]]  # <= 48 P2, <= 96 P3, <= 192 P4, else P5
    v2_box = torch.tensor([[[10.0, 10.0, 110.0, 110.0]]])  # 100 px in V2, 50 px in V3 (V2 at half size)
    in_v3 = v2_box / 2
    assert [assign_levels(b, LEVELS, canonical_size=encoder.canonical_size, rounding="ceil").item() for b in (v2_box, in_v3)] == [4, 3]
    toy = FpnObjectEncoder("resnet18", SocoParams(view_size=64, fpn_channels=16, head_dim=32))
    assert toy.canonical_size == pytest.approx(192 * 64 / 224)  # thresholds scale with V2, not per view


# -- the loss ---------------------------------------------------------------------------------------


def _hand_rows(method, batch: dict, name: str, online: bool) -> torch.Tensor:
    """(B, K, D) embeddings by the paper's recipe, box by box: the box's level from its sqrt(area)
    in this view against 48 / 96 / 192 px of a 224-px V2, RoIAlign there, the head, the MLPs."""
    encoder = method.encoder if online else method.encoder_target
    images, boxes, present = batch[name], batch[f"{name}_boxes"], batch[f"{name}_boxes_mask"]
    params = method.params
    rows, where = [], []
    if isinstance(method, Soco):
        pyramid = encoder.fpn(encoder.backbone.forward_stages(images))
        limits = np.array([48.0, 96.0, 192.0]) * params.view_size / 224
    else:
        c4 = encoder.backbone.forward_stages(images, until="c4")["c4"]
    for b in range(boxes.shape[0]):
        for k in range(boxes.shape[1]):
            if not present[b, k]:
                continue
            box = boxes[b, k][None]
            if isinstance(method, Soco):
                side = math.sqrt(float((box[0, 2] - box[0, 0]) * (box[0, 3] - box[0, 1])))
                level = 2 + int((side > limits).sum())
                feature, scale = pyramid[f"p{level}"][b : b + 1], 0.5**level
            else:
                feature, scale = c4[b : b + 1], 1 / 16
            rows.append(torchvision.ops.roi_align(feature, [box], params.roi_size, scale, sampling_ratio=0, aligned=True))
            where.append((b, k))
    pooled = torch.cat(rows)
    h = encoder.box_head(pooled) if isinstance(method, Soco) else encoder.backbone.layer4(pooled).mean(dim=(2, 3))
    out = method.predictor(method.projector(h)) if online else method.projector_target(h)
    dense = torch.zeros(*boxes.shape[:2], out.shape[1])
    for row, (b, k) in enumerate(where):
        dense[b, k] = out[row]
    return dense


def _hand_term(p: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over boxes present in both views of 2 - 2 cos (eq. 5's -2 cos, plus 2)."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=-1))[mask].mean()


def _moved_target(method):
    """Target weights unlike the online ones (as after training), so a swap of the two shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in list(method.encoder_target.parameters()) + list(method.projector_target.parameters()):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return method


@pytest.mark.parametrize(("variant", "overrides"), [("soco", {"star": True}), ("soco_c4", {})])
def test_loss_is_the_papers_symmetric_sum_recomputed_box_by_box(variant, overrides):
    method = _moved_target(_method(variant, **overrides))
    batch = _batch(method)
    names = [n for n in ("view1", "view2", "view3", "view4") if n in batch]
    assert len(names) == (4 if variant == "soco" else 2)
    out = method(batch, STEP)
    with torch.no_grad():
        p = {n: _hand_rows(method, batch, n, online=True) for n in names}
        z = {n: _hand_rows(method, batch, n, online=False) for n in names}
    total = 0.0
    for other in names[1:]:
        both = batch["view1_visible"] & batch[f"{other}_visible"]
        forward, backward = _hand_term(p["view1"], z[other], both), _hand_term(p[other], z["view1"], both)  # L, L~
        torch.testing.assert_close(out[f"loss_view1_{other}"], forward, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[f"loss_{other}_view1"], backward, rtol=1e-4, atol=1e-5)
        total = total + forward + backward
        # negative controls: the same box rolled to another row, or online instead of target, differ
        rolled = _hand_term(p["view1"], z[other].roll(1, dims=1), both)
        assert abs(float(rolled - forward)) > 1e-3
        swapped = _hand_term(p["view1"], p[other], both)
        assert abs(float(swapped - forward)) > 1e-3
    torch.testing.assert_close(out["loss"], total, rtol=1e-4, atol=1e-5)


def test_all_levels_option_keeps_each_boxs_assigned_level():
    # With no BN in the head a box's feature does not depend on the other rows, so pooling every
    # level and keeping the assigned one ([C]) equals pooling the assigned level only ([P]).
    assigned = _method(head_norm="none")
    every = _method(head_norm="none", roi_levels="all")
    every.load_state_dict(assigned.state_dict())
    batch = _batch(assigned)
    torch.testing.assert_close(every(batch, STEP)["loss"], assigned(batch, STEP)["loss"])


def _padded(batch: dict, extra: int) -> dict:
    """``batch`` with ``extra`` more box rows per image: garbage boxes, masked out."""
    padded = dict(batch)
    for key, value in batch.items():
        if key.endswith("_boxes"):
            padded[key] = torch.cat([value, torch.rand(value.shape[0], extra, 4) * 50], dim=1)
        elif key.endswith(("_mask", "_visible")):
            padded[key] = torch.cat([value, torch.zeros(value.shape[0], extra, dtype=torch.bool)], dim=1)
    return padded


def _loss_and_grads(method, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.zero_grad(set_to_none=True)
    loss = method(batch, STEP)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.parameters() if p.requires_grad]


def test_masked_boxes_change_neither_the_loss_nor_the_gradients():
    method = _method()
    batch = _batch(method, size=2)
    loss, grads = _loss_and_grads(method, batch)
    padded_loss, padded_grads = _loss_and_grads(method, _padded(batch, extra=3))
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=1e-7)
    for grad, padded_grad in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(padded_grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["soco", "soco_c4"])
def test_an_all_empty_mask_gives_a_finite_loss_and_every_parameter_a_gradient(variant):
    method = _method(variant)
    batch = _batch(method, size=2)
    for key in batch:
        if key.endswith(("_mask", "_visible")):
            batch[key] = torch.zeros_like(batch[key])
    loss, grads = _loss_and_grads(method, batch)
    assert loss.item() == 0.0
    assert len(grads) == sum(p.requires_grad for p in method.parameters())  # every one used (DDP)
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


# -- transfer ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Soco]:
    """A tiny SoCo's pretrained checkpoint, converted; returns (directory, the method)."""
    out = tmp_path_factory.mktemp("soco_weights")
    method = _method()
    # Weights other than a detector's built from the same seed (the encoder's backbone and FPN are
    # built in the same order) and BN statistics other than the defaults, so that loading them shows.
    with torch.no_grad():
        for parameter in method.encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        for module in method.encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    backbone, transfer = method.transfer_state()
    write_pretrained_checkpoint(
        out / "final.pt", method="soco", arch="resnet18", steps=1, epochs=1, backbone=backbone, transfer=transfer, config={}
    )
    report = convert_checkpoint(out / "final.pt", out / "w.tv.pth", out / "w.d2.pkl")  # raises on any unmapped key
    assert all(key.endswith("num_batches_tracked") for key in report.dropped)
    return out, method


# SoCo's detector, on top of test_finetune.tiny_benchmark: a norm after the FPN's convs and in the 4conv1fc head.
SOCO_DETECTOR = {
    "fpn_norm": "bn",
    "box_head": "4conv1fc",
    "head_norm": "bn",
    "heads": {"fpn_channels": 16, "box_head_dim": 32, "rpn_batch_size_per_image": 32, "roi_batch_size_per_image": 16,
              "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
              "rpn_post_nms_top_n_test": 50, "mask_head_channels": 8},
}  # fmt: skip


def _soco_benchmark(root: Path, **overrides) -> BenchmarkSettings:
    from test_finetune import tiny_benchmark  # tests/test_finetune.py (tests/ is on sys.path via its conftest)

    return tiny_benchmark(root, **{**SOCO_DETECTOR, **overrides})


def test_converted_fpn_and_box_head_load_into_a_4conv1fc_detector_and_compute_the_same(converted):
    out, method = converted
    benchmark = _soco_benchmark(out)
    assert benchmark.pretrained_modules == ("backbone", "fpn", "box_head")
    model = build_detector(benchmark, num_classes=2)
    fields = load_pretrained_weights(model, out / "w.tv.pth", "resnet18", modules=benchmark.pretrained_modules)
    assert fields["left_out"] == []
    state, weights = model.state_dict(), torch.load(out / "w.tv.pth", weights_only=True)["state_dict"]
    assert [k for k, v in weights.items() if not torch.equal(state[k], v)] == []
    assert any(k.startswith("backbone.fpn.") for k in weights) and any(k.startswith("roi_heads.box_head.") for k in weights)
    # the detector's head computes what the pretrained one did (names, flatten order, norms)
    x = torch.randn(5, 16, 7, 7)
    method.encoder.box_head.eval(), model.roi_heads.box_head.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.roi_heads.box_head(x), method.encoder.box_head(x))
    assert isinstance(method.encoder.box_head, ConvFCBoxHead)


def test_a_2fc_detector_leaves_the_4conv1fc_head_out_in_both_backends(converted):
    out, _ = converted
    benchmark = _soco_benchmark(out, box_head="2fc", head_norm="none")
    assert benchmark.pretrained_modules == ("backbone", "fpn")
    model = build_detector(benchmark, num_classes=2)
    before = model.roi_heads.box_head.state_dict()
    fields = load_pretrained_weights(model, out / "w.tv.pth", "resnet18", modules=benchmark.pretrained_modules)
    assert fields["left_out"] and all(key.startswith("roi_heads.box_head.") for key in fields["left_out"])
    assert all(torch.equal(v, model.roi_heads.box_head.state_dict()[k]) for k, v in before.items())
    # detectron2: a 2fc head's fc1 has the 4conv1fc head's fc1 shape (FC_DIM x C*7*7); suffix
    # matching would load it, so the backend hands detectron2 only the modules the detector takes.
    d2 = read_detectron2_weights(out / "w.d2.pkl")["model"]
    assert d2["box_head.fc1.weight"].shape == (32, 16 * 7 * 7)
    d2_2fc = BenchmarkSettings.from_dict(
        {"name": "d2", "dataset": {"root": "."}, "backend": "detectron2", "fpn_norm": "syncbn", "box_head": "2fc"}
    )
    kept, left_out = select_modules(d2, "detectron2", d2_2fc.pretrained_modules)
    assert "box_head.fc1.weight" in left_out and not any(k.startswith("box_head.") for k in kept)
    assert has_fpn_norm(d2, "detectron2")  # so a detectron2 FPN without a norm leaves it out too
    assert "fpn_lateral2.weight" in kept and "res2.0.conv1.weight" in kept
    d2_soco = dataclasses.replace(d2_2fc, box_head="4conv1fc", head_norm="syncbn")
    assert select_modules(d2, "detectron2", d2_soco.pretrained_modules) == (d2, [])
    backbone_only = dataclasses.replace(d2_soco, transfer=())
    assert all(k.startswith(("stem.", "res")) for k in select_modules(d2, "detectron2", backbone_only.pretrained_modules)[0])


def test_an_fpn_of_another_width_is_refused_clearly_and_one_of_another_norm_left_out(converted):
    out, _ = converted
    wider = _soco_benchmark(out, heads={"fpn_channels": 32, "box_head_dim": 32})
    with pytest.raises(ValueError, match=r"FPN width: the pretrained FPN has 16 channels .* this detector's 32"):
        load_pretrained_weights(build_detector(wider, 2), out / "w.tv.pth", "resnet18", modules=wider.pretrained_modules)
    plain = _soco_benchmark(out, fpn_norm="none")  # its convs were trained before a BN: not for this FPN
    model = build_detector(plain, 2)
    fields = load_pretrained_weights(model, out / "w.tv.pth", "resnet18", modules=plain.pretrained_modules)
    assert {module_of(k, "torchvision") for k in fields["left_out"]} == {"fpn"}
    weights = torch.load(out / "w.tv.pth", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["roi_heads.box_head.5.weight"], weights["roi_heads.box_head.5.weight"])
    # the backbone-only ablation
    ablation = dataclasses.replace(plain, transfer=())
    fields = load_pretrained_weights(build_detector(ablation, 2), out / "w.tv.pth", "resnet18", modules=ablation.pretrained_modules)
    assert {module_of(k, "torchvision") for k in fields["left_out"]} == {"fpn", "box_head"}


def test_a_retinanet_takes_the_fpn_from_c3_on(converted):
    out, _ = converted
    benchmark = _soco_benchmark(out, model="retinanet", box_head="2fc", head_norm="none")
    assert benchmark.pretrained_modules == ("backbone", "fpn")
    model = build_detector(benchmark, num_classes=2)
    fields = load_pretrained_weights(model, out / "w.tv.pth", "resnet18", modules=benchmark.pretrained_modules)
    weights, state = torch.load(out / "w.tv.pth", weights_only=True)["state_dict"], model.state_dict()
    for level in (3, 4, 5):  # regioncl's FPN counts from C2, torchvision's RetinaNet FPN from C3
        detector_key, pretrained_key = (f"backbone.fpn.inner_blocks.{level - first}.0.weight" for first in (3, 2))
        assert torch.equal(state[detector_key], weights[pretrained_key])
    assert {k for k in fields["left_out"] if k.startswith("backbone.fpn.")} == {
        f"backbone.fpn.{kind}_blocks.0.{part}" for kind in ("inner", "layer") for part in
        ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var")  # BN counters are not converted
    }


def test_converted_weights_finetune_a_mask_rcnn_with_norms_in_fpn_and_heads(converted, tmp_path):
    out, _ = converted
    names = ("backbone.fpn.layer_blocks.0.0.weight", "roi_heads.box_head.0.0.weight", "roi_heads.box_head.5.weight")
    detector = converted_weights_finetune(out / "final.pt", tmp_path, "soco", names, **SOCO_DETECTOR, model="mask_rcnn")
    assert "roi_heads.mask_head.0.1.running_var" in detector  # head_norm reaches the mask head


# -- through the engine -----------------------------------------------------------------------------


def _write_shards(directory: Path, num_images: int = 12) -> list[Path]:
    """Noise images of 40-64 px with 16 proposals each, in one shard."""
    rng = np.random.default_rng(0)
    path = directory / "shard0.tar"
    with wds.TarWriter(str(path)) as writer:
        for index in range(num_images):
            width, height = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
            meta = {"width": width, "height": height, "boxes": _proposals(rng, width, height).tolist()}
            writer.write({"__key__": f"img{index:03d}", "jpg": jpeg.getvalue(), "json": json.dumps(meta).encode()})
    return [path]


RUN = {
    "method": "soco",
    "method_params": {**TINY_FPN, "view_size": 48, "small_view_size": 24},
    "arch": "resnet18",
    "epochs": 1,
    "batch_size": 4,  # 12 images -> 3 steps
    "optimizer": {"name": "lars", "base_lr": 1.0, "reference_batch": 256, "weight_decay": 1.0e-5},
    "num_workers": 0,
    "seed": 3,
    "checkpoint_every_steps": 10,
    "log_every": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    return _write_shards(tmp_path_factory.mktemp("soco_shards"))


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_stop_ends_bitwise_equal_to_the_uninterrupted_run(shards, tmp_path, capsys):
    straight, expected = stopped_and_resumed_run_equals_straight_run(PretrainSettings.from_dict(RUN), shards, tmp_path, capsys)
    final = torch.load(straight / "final.pt", weights_only=True)
    assert (final["method"], sorted(final["transfer"])) == ("soco", ["box_head", "fpn"])


@pytest.mark.slow  # ~40 s: a 1-process run and a 2-process spawn
def test_two_gloo_processes_agree_with_one_on_the_first_step(shards, tmp_path):

    run = {**RUN, "sync_bn": True}  # BN statistics over the same global batch of boxes in both runs
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(PretrainSettings.from_dict(run), shards, one / "final.pt", one)
    spawn_two_ranks(run, shards, two)
    first_one, first_two = _records(one)[0], _records(two)[0]
    for name in ("loss", "loss_view1_view2", "loss_view2_view1", "loss_view1_view3", "loss_view3_view1"):
        assert first_two[name] == pytest.approx(first_one[name], abs=1e-5), name


def _embedded_shards(directory: Path) -> list[Path]:
    """The embedded generator's unlabeled images, selective-search proposals, one shard (the pipeline's stages)."""
    from regioncl.data.embedded import EmbeddedSettings, generate_embedded
    from regioncl.data.shards import write_shard
    from regioncl.data.sources import list_images, write_image_list
    from regioncl.proposals import ProposalSettings
    from regioncl.proposals.chunk import run_chunk

    generate_embedded(directory / "embedded", EmbeddedSettings(seed=0, n_unlabeled=32, n_train=0, n_val=0, image_size=96))
    write_image_list(list_images("embedded", directory / "embedded"), directory / "images.tsv")
    settings = ProposalSettings.from_dict({"selective_search": {"mode": "fast", "max_side": 96}})
    run_chunk(directory / "images.tsv", 0, 1, directory / "proposals.parquet", directory / "report.json", settings)
    write_shard(directory / "proposals.parquet", directory / "shard.tar")
    return [directory / "shard.tar"]


@pytest.mark.slow  # ~70 s: the embedded stages, then 4 epochs of 32 images
def test_a_short_run_on_the_embedded_shards_lowers_its_loss_without_collapse(tmp_path):
    shards = _embedded_shards(tmp_path)
    run = {**RUN, "epochs": 4, "batch_size": 8, "optimizer": {**RUN["optimizer"], "base_lr": 2.0, "reference_batch": 8}}
    pretrain(PretrainSettings.from_dict(run), shards, tmp_path / "final.pt", tmp_path / "work")
    records = _records(tmp_path / "work")
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(loss) for loss in losses)
    # step 1 is the initial network (4 terms of 2 - 2 cos near 2); the last epoch predicts its target well
    assert np.mean(losses[-4:]) < 0.5 * losses[0], losses
    # collapse would put every box on one point: the normalized projections' spread would go to 0
    floor = 0.25 / math.sqrt(RUN["method_params"]["feature_dim"])
    assert min(r["projection_std"] for r in records[-4:]) > floor, [r["projection_std"] for r in records]
