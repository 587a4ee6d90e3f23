"""The region toolkit's models: backbone stages, FPN, level assignment, RoIAlign, PrRoIPool, box head."""

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align

from regioncl.models import FPN, ConvFCBoxHead, ResNetBackbone
from regioncl.models.roi import assign_levels, multilevel_roi_align, precise_roi_pool, roi_align_boxes

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --- backbone and FPN -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_exposes_every_stage_with_its_declared_channels_and_stride(arch):
    backbone = ResNetBackbone(arch).eval()
    with torch.no_grad():
        stages = backbone.forward_stages(torch.randn(1, 3, 64, 64))
        assert list(stages) == ["c2", "c3", "c4", "c5"]
        for name, feature in stages.items():
            level = int(name[1])
            assert feature.shape == (1, backbone.stage_channels[name], 64 >> level, 64 >> level)
        ones = torch.ones(1, 3, 64, 64)
        torch.testing.assert_close(backbone(ones), backbone.forward_stages(ones)["c5"].mean((2, 3)))
        assert list(backbone.forward_stages(torch.randn(1, 3, 64, 64), until="c4")) == ["c2", "c3", "c4"]


def _stages(batch: int = 2, size: int = 64, channels: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    channels = channels or {"c2": 8, "c3": 16, "c4": 32, "c5": 64}
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(batch, c, size >> int(name[1]), size >> int(name[1]), generator=generator)
        for name, c in channels.items()
    }


def test_fpn_from_c2_computes_lins_top_down_pyramid():
    stages = _stages()
    fpn = FPN({name: s.shape[1] for name, s in stages.items()}, 16).eval()
    with torch.no_grad():
        pyramid = fpn(stages)
        assert list(pyramid) == ["p2", "p3", "p4", "p5"]
        # by hand: laterals, nearest 2x upsampling, 3x3 outputs
        lateral = {level: fpn.inner_blocks[str(level - 2)](stages[f"c{level}"]) for level in (2, 3, 4, 5)}
        top_down = {5: lateral[5]}
        for level in (4, 3, 2):
            top_down[level] = lateral[level] + F.interpolate(top_down[level + 1], scale_factor=2, mode="nearest")
        for level in (2, 3, 4, 5):
            torch.testing.assert_close(pyramid[f"p{level}"], fpn.layer_blocks[str(level - 2)](top_down[level]))


def test_fpn_from_c3_names_its_blocks_from_c2_and_builds_output_convs_only_for_returned_levels():
    stages = _stages()
    fpn = FPN({name: s.shape[1] for name, s in stages.items()}, 16, in_levels=(3, 4, 5), out_levels=(3, 4), norm="bn")
    names = {key.split(".")[0] + "." + key.split(".")[1] for key in fpn.state_dict()}
    assert names == {"inner_blocks.1", "inner_blocks.2", "inner_blocks.3", "layer_blocks.1", "layer_blocks.2"}
    assert fpn.state_dict()["inner_blocks.1.0.weight"].shape == (16, 16, 1, 1)  # C3's lateral
    assert "inner_blocks.1.1.running_var" in fpn.state_dict() and "inner_blocks.1.0.bias" not in fpn.state_dict()
    pyramid = fpn.train()(stages)
    assert {name: tuple(p.shape) for name, p in pyramid.items()} == {"p3": (2, 16, 8, 8), "p4": (2, 16, 4, 4)}
    sum(p.sum() for p in pyramid.values()).backward()
    assert all(p.grad is not None for p in fpn.parameters())  # nothing unused for DDP


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_levels": (2, 4, 5)}, "consecutive"),
        ({"in_levels": (3, 4, 5), "out_levels": (2, 3)}, "out_levels"),
        ({"norm": "syncbn"}, "norm: expected one of"),
    ],
)
def test_fpn_rejects_bad_levels_and_norms_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FPN({"c2": 8, "c3": 16, "c4": 32, "c5": 64}, 16, **kwargs)


# --- level assignment and RoIAlign ------------------------------------------------------------

def _square_boxes(sides: list[float]) -> torch.Tensor:
    """(1, K, 4) boxes of sqrt(wh) = side."""
    return torch.tensor([[[0.0, 0.0, side, side] for side in sides]])


def test_fpn_equation_1_assigns_levels_by_box_size_clamped_to_the_pyramid():
    sides = [0.0, 20.0, 111.0, 112.0, 223.0, 224.0, 448.0, 2000.0]
    # k = floor(4 + log2(s / 224)): 112 -> 3, 224 -> 4, 448 -> 5; tiny and empty boxes -> P2
    assert assign_levels(_square_boxes(sides), (2, 3, 4, 5)).tolist() == [[2, 2, 2, 3, 3, 4, 5, 5]]


def test_socos_released_thresholds_are_equation_1_with_ceil_at_192_and_scale_with_the_reference_view():
    sides = [10.0, 48.0, 49.0, 96.0, 97.0, 192.0, 193.0, 224.0]
    levels = assign_levels(_square_boxes(sides), (2, 3, 4, 5), canonical_size=192, rounding="ceil")
    assert levels.tolist() == [[2, 2, 3, 3, 4, 4, 5, 5]]  # <= 48 P2, <= 96 P3, <= 192 P4, else P5
    # 112-px reference views: every threshold halves (a 48-px box now counts as "96")
    halved = assign_levels(_square_boxes([s / 2 for s in sides]), (2, 3, 4, 5), canonical_size=192 * 112 / 224, rounding="ceil")
    assert halved.tolist() == levels.tolist()


def test_multilevel_roi_align_pools_each_box_on_its_level_in_the_input_order():
    generator = torch.Generator().manual_seed(0)
    features = {f"p{level}": torch.randn(2, 3, 64 >> level, 64 >> level, generator=generator) for level in (2, 3, 4, 5)}
    boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [5.0, 6.0, 60.0, 50.0], [10.0, 20.0, 30.0, 24.0]],
         [[1.0, 2.0, 63.0, 64.0], [8.0, 8.0, 16.0, 40.0], [0.0, 0.0, 0.0, 0.0]]]
    )  # (B=2, K=3, 4) view px; the last one a zero-size padded box
    levels = torch.tensor([[2, 5, 3], [4, 3, 2]])
    pooled = multilevel_roi_align(features, boxes, levels, 4)
    assert pooled.shape == (2, 3, 3, 4, 4) and torch.isfinite(pooled).all()
    for image in range(2):
        for box in range(3):
            level = int(levels[image, box])
            roi = torch.cat([torch.tensor([float(image)]), boxes[image, box]])[None]
            expected = roi_align(features[f"p{level}"], roi, 4, 1 / 2**level, sampling_ratio=0, aligned=True)[0]
            torch.testing.assert_close(pooled[image, box], expected)
    single = roi_align_boxes(features["p3"], boxes, 4, 8)
    torch.testing.assert_close(single[levels == 3], pooled[levels == 3])


def test_every_pyramid_level_keeps_gradients_when_all_boxes_land_on_one_level():
    stages = _stages()
    fpn = FPN({name: s.shape[1] for name, s in stages.items()}, 8)
    pyramid = fpn(stages)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0]], [[4.0, 4.0, 12.0, 12.0]]])  # (2, 1, 4)
    pooled = multilevel_roi_align(pyramid, boxes, assign_levels(boxes, (2, 3, 4, 5)), 2)
    assert assign_levels(boxes, (2, 3, 4, 5)).unique().tolist() == [2]
    pooled.sum().backward()
    assert all(p.grad is not None for p in fpn.parameters())


# --- exact integral pooling (PrRoIPool 1x1) --------------------------------------------------

def _brute_force_mean(feature: torch.Tensor, box: list[float], stride: int, samples: int = 600) -> torch.Tensor:
    """Midpoint-rule mean over ``box`` of the bilinearly interpolated map (zero outside), by grid_sample."""
    height, width = feature.shape[-2:]
    x1, y1, x2, y2 = box
    xs = x1 + (torch.arange(samples, dtype=torch.float64) + 0.5) * (x2 - x1) / samples  # view px
    ys = y1 + (torch.arange(samples, dtype=torch.float64) + 0.5) * (y2 - y1) / samples
    # view px -> feature px (cell j covers [j, j+1) * stride) -> grid_sample's [-1, 1] (align_corners=False)
    gy, gx = torch.meshgrid(2 * ys / stride / height - 1, 2 * xs / stride / width - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]  # (1, samples, samples, 2)
    values = F.grid_sample(feature[None].double(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return values[0].mean(dim=(1, 2))  # (C,)


def test_precise_roi_pool_equals_a_fine_numerical_integral_of_the_bilinear_map():
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 7, 9, generator=generator, dtype=torch.float64)  # stride 16: a 112 x 144 view
    boxes = torch.tensor(
        [[[0.0, 0.0, 144.0, 112.0], [13.0, 7.5, 61.0, 55.0], [100.2, 3.0, 150.0, 30.0]],  # whole view, inner, past the edge
         [[40.0, 40.0, 41.0, 90.0], [-20.0, -10.0, 8.0, 5.0], [70.0, 20.0, 118.0, 68.0]]],
        dtype=torch.float64,
    )
    pooled = precise_roi_pool(feature, boxes, 16)  # (2, 3, C)
    assert pooled.shape == (2, 3, 3)
    for image in range(2):
        for box in range(3):
            expected = _brute_force_mean(feature[image], boxes[image, box].tolist(), 16)
            torch.testing.assert_close(pooled[image, box], expected, rtol=1e-4, atol=1e-5)


def test_precise_roi_pool_by_hand():
    # 1 x 2 map [a, b], stride 1, box over the whole map (u in [-0.5, 1.5] cells): each value's
    # tent integrates to 0.875 inside it (0.125 lies outside the map), so the mean along x is
    # 0.875 (a + b) / 2; along y the one row's tent integrates to 0.75 over [-0.5, 0.5].
    feature = torch.tensor([[[[2.0, 6.0]]]], dtype=torch.float64)
    whole = precise_roi_pool(feature, torch.tensor([[[0.0, 0.0, 2.0, 1.0]]], dtype=torch.float64), 1)
    assert whole.item() == pytest.approx(0.75 * 0.875 * (2.0 + 6.0) / 2)
    # a box between the two cell centres (x in [0.5, 1.5] px) on the centre row: the linear ramp's mean, 4
    between = precise_roi_pool(feature, torch.tensor([[[0.5, 0.5, 1.5, 0.5 + 1e-7]]], dtype=torch.float64), 1)
    assert between.item() == pytest.approx(4.0, rel=1e-6)
    # constant map, box well inside: the constant; empty (padded) box: 0
    constant = torch.full((1, 2, 8, 8), 3.0)
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 12.0], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(precise_roi_pool(constant, boxes, 4), torch.tensor([[[3.0, 3.0], [0.0, 0.0]]]))
    # aligned=False: cell j sits at x = j * stride (the released PrRoIPool), i.e. half a cell left
    torch.testing.assert_close(
        precise_roi_pool(feature, torch.tensor([[[0.0, 0.0, 1.0, 1e-6]]], dtype=torch.float64), 1, aligned=False),
        precise_roi_pool(feature, torch.tensor([[[0.5, 0.5, 1.5, 0.5 + 1e-6]]], dtype=torch.float64), 1),
    )


def test_precise_roi_pool_is_differentiable_in_features_and_boxes():
    generator = torch.Generator().manual_seed(1)
    feature = torch.randn(1, 2, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[3.3, 2.1, 15.7, 11.2], [0.5, 4.0, 9.0, 14.9]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, b: precise_roi_pool(f, b, 4), (feature, boxes))


# --- box head ---------------------------------------------------------------------------------

def test_box_head_is_4_conv_norm_relu_then_fc_relu_with_detectron2_names():
    head = ConvFCBoxHead(8, conv_dim=16, fc_dim=32, input_size=7, norm="bn")
    names = set(head.state_dict())
    assert {"conv1.weight", "conv1.norm.weight", "conv4.norm.running_var", "fc1.weight", "fc1.bias"} <= names
    assert "conv1.bias" not in names and head.fc1.weight.shape == (32, 16 * 49)
    x = torch.randn(5, 8, 7, 7)
    out = head.eval()(x)
    by_hand = x
    for k in range(1, 5):
        conv = getattr(head, f"conv{k}")
        by_hand = F.relu(conv.norm(F.conv2d(by_hand, conv.weight, padding=1)))
    torch.testing.assert_close(out, F.relu(head.fc1(by_hand.flatten(1))))
    assert "conv2.bias" in ConvFCBoxHead(8, conv_dim=16, fc_dim=32, norm="none").state_dict()
    with pytest.raises(ValueError, match="7x7 RoI features"):
        head(torch.randn(1, 8, 14, 14))


def test_region_pooling_runs_under_bf16_autocast_and_precise_pooling_returns_float32():
    generator = torch.Generator().manual_seed(3)
    feature = torch.randn(1, 4, 14, 14, generator=generator)
    conv = torch.nn.Conv2d(4, 4, 1)
    boxes = torch.tensor([[[100.3, 17.9, 148.3, 65.9], [0.0, 0.0, 224.0, 224.0]]])  # float32 rois, whatever the map
    with torch.no_grad():
        reference_map = conv(feature)
        exact = precise_roi_pool(reference_map, boxes, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_map = conv(feature)
            assert low_map.dtype == torch.bfloat16
            pooled = precise_roi_pool(low_map, boxes, 16)
            aligned = multilevel_roi_align({"p4": low_map}, boxes, torch.full((1, 2), 4), 2)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, exact, rtol=2e-2, atol=2e-2)  # only the map's bf16 rounding remains
    torch.testing.assert_close(aligned.float(), roi_align_boxes(reference_map, boxes, 2, 16), rtol=3e-2, atol=3e-2)
