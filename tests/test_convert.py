"""Weight conversion: key maps for detectron2 and torchvision, strictness, file formats."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from regioncl.convert import (
    DETECTRON2_BACKBONE,
    DETECTRON2_BOX_HEAD,
    DETECTRON2_FPN,
    TORCHVISION_BACKBONE,
    TORCHVISION_BOX_HEAD,
    TORCHVISION_FPN,
    ConversionError,
    convert_checkpoint,
    map_keys,
)
from regioncl.models import FPN, ConvFCBoxHead
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.torchvision_backend import (
    build_detector,
    load_pretrained_weights,
)
from regioncl.weights import WeightsFormatError


@functools.lru_cache(maxsize=None)
def seeded_resnet_state(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).state_dict()


def resnet_backbone(arch: str) -> dict[str, torch.Tensor]:
    """A pretrained checkpoint's `backbone` entry (a fresh dict: tests may edit it)."""
    return {k: v for k, v in seeded_resnet_state(arch).items() if not k.startswith("fc.")}


def write_pretrained(path: Path, arch: str, backbone: dict, transfer: dict | None = None) -> Path:
    torch.save(
        {
            "format": "regioncl.pretrained/1",
            "method": "moco_v2",
            "arch": arch,
            "steps": 10,
            "epochs": 1,
            "backbone": backbone,
            "transfer": transfer or {},
            "config": {"arch": arch},
        },
        path,
    )
    return path


def moco_detectron2_name(key: str) -> str:
    """MoCo's published converter (convert-pretrain-to-detectron2.py), an independent oracle."""
    if "layer" not in key:
        key = "stem." + key
    for t in [1, 2, 3, 4]:
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_backbone_key_maps_to_moco_converter_names(arch: str) -> None:
    backbone = resnet_backbone(arch)
    renamed, dropped, unmapped = map_keys(backbone, DETECTRON2_BACKBONE)
    assert unmapped == []
    assert dropped and all(k.endswith("num_batches_tracked") for k in dropped)
    expected = {moco_detectron2_name(k) for k in backbone if k not in dropped}
    assert set(renamed) == expected


def test_detectron2_names_checked_by_hand() -> None:
    r50, _, _ = map_keys(resnet_backbone("resnet50"), DETECTRON2_BACKBONE)
    r18, _, _ = map_keys(resnet_backbone("resnet18"), DETECTRON2_BACKBONE)
    r50_source = resnet_backbone("resnet50")
    assert torch.equal(
        r50["res2.0.shortcut.norm.running_var"], r50_source["layer1.0.downsample.1.running_var"]
    )
    assert torch.equal(r50["stem.conv1.norm.weight"], r50_source["bn1.weight"])
    assert torch.equal(r50["res3.0.conv3.weight"], r50_source["layer2.0.conv3.weight"])
    assert torch.equal(r50["res5.2.conv2.norm.bias"], r50_source["layer4.2.bn2.bias"])
    assert "stem.conv1.weight" in r18 and "res3.0.shortcut.weight" in r18
    assert "res2.0.shortcut.weight" not in r18  # BasicBlock stage 1 keeps 64 channels
    assert "res2.0.conv3.weight" not in r18  # BasicBlock has two convs
    assert not any("num_batches_tracked" in k for k in r18)


def test_torchvision_names_prefix_the_resnet_keys() -> None:
    renamed, _, unmapped = map_keys(resnet_backbone("resnet18"), TORCHVISION_BACKBONE)
    assert unmapped == []
    assert "backbone.body.layer1.0.conv1.weight" in renamed
    assert "backbone.body.bn1.running_mean" in renamed
    assert all(k.startswith("backbone.body.") for k in renamed)


def test_detectron2_pkl_is_a_pickle_of_numpy_arrays(tmp_path: Path) -> None:
    source = resnet_backbone("resnet18")
    ckpt = write_pretrained(tmp_path / "ckpt.pt", "resnet18", source)
    report = convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    with open(tmp_path / "w.d2.pkl", "rb") as f:
        weights = pickle.load(f)
    assert weights["__author__"] == "regioncl"
    assert weights["matching_heuristics"] is True
    model = weights["model"]
    assert all(isinstance(v, np.ndarray) for v in model.values())
    assert len(model) == report.detectron2_keys == report.torchvision_keys
    np.testing.assert_array_equal(model["res3.0.shortcut.weight"], source["layer2.0.downsample.0.weight"].numpy())
    assert report.arch == "resnet18" and report.method == "moco_v2"


def test_torchvision_weights_load_into_the_detector(tmp_path: Path) -> None:
    source = resnet_backbone("resnet18")
    ckpt = write_pretrained(tmp_path / "ckpt.pt", "resnet18", source)
    convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    saved = torch.load(tmp_path / "w.tv.pth", weights_only=True)
    assert saved["format"] == "regioncl.torchvision/1"
    assert (saved["arch"], saved["method"]) == ("resnet18", "moco_v2")

    benchmark = BenchmarkSettings.from_dict(
        {"name": "b", "dataset": {"root": "."}, "model": "faster_rcnn", "arch": "resnet18",
         "norm": "bn", "heads": {"fpn_channels": 32, "box_head_dim": 64}}
    )
    model = build_detector(benchmark, num_classes=2)
    load_pretrained_weights(model, tmp_path / "w.tv.pth", "resnet18")
    loaded = model.state_dict()
    for key, value in source.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[f"backbone.body.{key}"], value), key


def test_dropped_key_fails_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    source = resnet_backbone("resnet18")
    del source["layer3.1.bn2.running_var"]
    ckpt = write_pretrained(tmp_path / "ckpt.pt", "resnet18", source)
    with pytest.raises(ConversionError, match=r"missing backbone\.body\.layer3\.1\.bn2\.running_var"):
        convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    assert not (tmp_path / "w.tv.pth").exists() and not (tmp_path / "w.d2.pkl").exists()


def test_wrong_shape_fails_naming_the_key(tmp_path: Path) -> None:
    source = resnet_backbone("resnet18")
    source["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    ckpt = write_pretrained(tmp_path / "ckpt.pt", "resnet18", source)
    with pytest.raises(ConversionError, match=r"layer2\.0\.conv1\.weight has shape \(128, 64, 1, 1\)"):
        convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")


def test_unexpected_key_and_unmapped_module_are_named(tmp_path: Path) -> None:
    source = resnet_backbone("resnet18")
    source["fc.weight"] = torch.zeros(10, 512)
    ckpt = write_pretrained(
        tmp_path / "ckpt.pt", "resnet18", source, transfer={"neck2": {"inner.weight": torch.zeros(1)}}
    )
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    message = str(error.value)
    assert "unexpected fc.weight" in message
    assert "backbone.fc.weight has no rule" in message
    assert "no key map for transferred module 'neck2'" in message


def test_wrong_format_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "something/else"}, path)
    with pytest.raises(WeightsFormatError, match="expected 'regioncl.pretrained/1'"):
        convert_checkpoint(path, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")


BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def fpn_state(in_channels: list[int], normalised: bool) -> dict[str, torch.Tensor]:
    """A torchvision FeaturePyramidNetwork's tensors (with BN after each conv if normalised)."""
    torch.manual_seed(1)
    norm = torch.nn.BatchNorm2d if normalised else None
    fpn = torchvision.ops.FeaturePyramidNetwork(in_channels, 32, norm_layer=norm)
    return fpn.state_dict()


def soco_box_head_state(channels: int = 32, fc_dim: int = 64) -> dict[str, torch.Tensor]:
    """detectron2's FastRCNNConvFCHead(4 conv + SyncBN, 1 fc) tensor names and shapes."""
    state = {}
    for n in range(1, 5):
        state[f"conv{n}.weight"] = torch.randn(channels, channels, 3, 3)
        for param in BN_PARAMS:
            state[f"conv{n}.norm.{param}"] = torch.rand(channels)
        state[f"conv{n}.norm.num_batches_tracked"] = torch.tensor(5)
    state["fc1.weight"] = torch.randn(fc_dim, channels * 7 * 7)
    state["fc1.bias"] = torch.randn(fc_dim)
    return state


def test_normalised_fpn_maps_to_detectron2_lateral_and_output_names() -> None:
    source = fpn_state([64, 128, 256, 512], normalised=True)
    renamed, dropped, unmapped = map_keys(source, DETECTRON2_FPN)
    expected = {
        f"fpn_{kind}{level}.{suffix}"
        for kind in ("lateral", "output")
        for level in (2, 3, 4, 5)
        for suffix in ("weight", *(f"norm.{p}" for p in BN_PARAMS))
    }
    assert set(renamed) == expected and not unmapped
    assert len(dropped) == 8  # one BN counter per conv
    assert renamed["fpn_lateral4.weight"] is source["inner_blocks.2.0.weight"]
    assert renamed["fpn_output2.norm.running_var"] is source["layer_blocks.0.1.running_var"]
    assert renamed["fpn_lateral5.weight"].shape == (32, 512, 1, 1)


def test_plain_fpn_keeps_its_conv_biases_in_both_targets() -> None:
    source = fpn_state([64, 128, 256, 512], normalised=False)
    d2, _, d2_unmapped = map_keys(source, DETECTRON2_FPN)
    tv, _, tv_unmapped = map_keys(source, TORCHVISION_FPN)
    assert not d2_unmapped and not tv_unmapped
    assert d2["fpn_output3.bias"] is source["layer_blocks.1.0.bias"]
    assert set(tv) == {f"backbone.fpn.{k}" for k in source}


def test_soco_box_head_maps_to_detectron2_box_head_names() -> None:
    source = soco_box_head_state()
    renamed, dropped, unmapped = map_keys(source, DETECTRON2_BOX_HEAD)
    assert not unmapped and len(dropped) == 4
    assert set(renamed) == {f"box_head.{k}" for k in source if not k.endswith("num_batches_tracked")}
    assert renamed["box_head.conv3.norm.running_mean"] is source["conv3.norm.running_mean"]
    assert renamed["box_head.fc1.weight"].shape == (64, 32 * 49)


def test_soco_checkpoint_transfers_fpn_and_head_to_both_targets(tmp_path: Path) -> None:
    transfer = {"fpn": fpn_state([64, 128, 256, 512], normalised=True), "box_head": soco_box_head_state()}
    ckpt = write_pretrained(tmp_path / "ckpt.pt", "resnet18", resnet_backbone("resnet18"), transfer)
    report = convert_checkpoint(ckpt, tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")
    with open(tmp_path / "w.d2.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    assert {"fpn_lateral2.norm.running_var", "fpn_output5.weight", "box_head.conv4.weight", "box_head.fc1.bias"} <= set(model)
    tv_keys = torch.load(tmp_path / "w.tv.pth", weights_only=True)["state_dict"]
    expected_tv = {"backbone.fpn.inner_blocks.0.1.weight", "roi_heads.box_head.3.1.running_var", "roi_heads.box_head.5.weight"}
    assert expected_tv <= set(tv_keys)
    assert report.detectron2_keys == report.torchvision_keys


# --- the region toolkit's modules convert to both detectors' names ---------------------------

def _convert(module: torch.nn.Module, rules, prefix: str) -> dict[str, torch.Tensor]:
    """``module``'s state dict renamed by ``rules`` with ``prefix`` stripped; every key mapped."""
    renamed, dropped, unmapped = map_keys(module.state_dict(), rules)
    assert not unmapped and all(k.endswith("num_batches_tracked") for k in dropped)
    assert all(k.startswith(prefix) for k in renamed)
    return {k[len(prefix):]: v for k, v in renamed.items()}


def _randomize_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so a misplaced tensor changes the output."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                for tensor in (layer.weight, layer.bias, layer.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
    return module.eval()


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_regioncl_fpn_loads_into_torchvisions_fpn_and_computes_the_same_pyramid(norm: str) -> None:
    channels = {"c2": 64, "c3": 128, "c4": 256, "c5": 512}  # resnet18
    fpn = _randomize_norms(FPN(channels, 32, norm=norm))
    reference = torchvision.ops.FeaturePyramidNetwork(
        list(channels.values()), 32, norm_layer=torch.nn.BatchNorm2d if norm == "bn" else None
    ).eval()
    reference.load_state_dict(_convert(fpn, TORCHVISION_FPN, "backbone.fpn."), strict=True)
    stages = {name: torch.randn(1, c, 64 >> int(name[1]), 64 >> int(name[1])) for name, c in channels.items()}
    with torch.no_grad():
        ours, theirs = fpn(stages), reference(stages)
    for level in (2, 3, 4, 5):
        torch.testing.assert_close(ours[f"p{level}"], theirs[f"c{level}"])
    # and torchvision's detection FPN (resnet_fpn_backbone: C2-C5) has exactly these names
    detection = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d)
    detection.fpn = reference
    expected = {f"backbone.fpn.{k}" for k in detection.fpn.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(map_keys(fpn.state_dict(), TORCHVISION_FPN)[0]) == expected


def test_an_fpn_from_c3_keeps_stage_names_in_both_targets() -> None:
    fpn = FPN({"c2": 64, "c3": 128, "c4": 256, "c5": 512}, 32, in_levels=(3, 4, 5), out_levels=(3, 4), norm="bn")
    d2, dropped, unmapped = map_keys(fpn.state_dict(), DETECTRON2_FPN)
    assert not unmapped and len(dropped) == 5
    # ReSim's released converter: fpn_lateral{3,4,5}, fpn_output{3,4}
    assert {k.split(".")[0] for k in d2} == {"fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output3", "fpn_output4"}
    assert d2["fpn_lateral3.weight"].shape == (32, 128, 1, 1)
    tv, _, _ = map_keys(fpn.state_dict(), TORCHVISION_FPN)
    # In a C2-C5 torchvision FPN, index l - 2 is stage l: C3's lateral is inner_blocks.1
    assert tv["backbone.fpn.inner_blocks.1.0.weight"].shape == (32, 128, 1, 1)
    assert not any(k.startswith(("backbone.fpn.inner_blocks.0", "backbone.fpn.layer_blocks.3")) for k in tv)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_box_head_loads_into_torchvisions_4conv1fc_head_and_computes_the_same_features(norm: str) -> None:
    head = _randomize_norms(ConvFCBoxHead(16, conv_dim=16, fc_dim=24, input_size=7, norm=norm))
    reference = FastRCNNConvFCHead((16, 7, 7), [16] * 4, [24], norm_layer=torch.nn.BatchNorm2d if norm == "bn" else None)
    reference.load_state_dict(_convert(head, TORCHVISION_BOX_HEAD, "roi_heads.box_head."), strict=True)
    x = torch.randn(3, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(head(x), reference.eval()(x))


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_box_head_maps_to_detectron2s_fast_rcnn_conv_fc_head_names(norm: str) -> None:
    head = ConvFCBoxHead(16, conv_dim=16, fc_dim=24, norm=norm)
    renamed, dropped, unmapped = map_keys(head.state_dict(), DETECTRON2_BOX_HEAD)
    assert not unmapped
    per_conv = ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var") if norm == "bn" else ("bias",)
    expected = {f"box_head.conv{k}.{suffix}" for k in range(1, 5) for suffix in ("weight", *per_conv)}
    assert set(renamed) == expected | {"box_head.fc1.weight", "box_head.fc1.bias"}
    assert torch.equal(renamed["box_head.conv3.weight"], head.conv3.weight)
