"""A test method that carries boxes, a cell grid and points through collation and the engine;
and the import rule that keeps methods independent of the engine."""

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch import nn

from regioncl.engine import PretrainSettings, pretrain
from regioncl.geometry import (
    View,
    map_boxes,
    map_points,
    random_resized_crop,
    render_view,
)
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import make_target

CROP = 16


def _grid(view: View, cells: int) -> np.ndarray:
    """(cells * cells, 4) x1y1x2y2 view-px boxes of a cells x cells grid over the view."""
    edges_x, edges_y = np.linspace(0, view.out_w, cells + 1), np.linspace(0, view.out_h, cells + 1)
    return np.array([[edges_x[i], edges_y[j], edges_x[i + 1], edges_y[j + 1]] for j in range(cells) for i in range(cells)])


@dataclass(frozen=True)
class ProbeParams:
    momentum: float = 0.9
    crop_size: int = CROP


@register_method("interface_probe")
class InterfaceProbe(PretrainMethod):
    """BN-free: a linear map of pooled pixels; the loss is a per-sample mean, so batch splits are exact."""

    Params = ProbeParams
    ragged_keys = frozenset({"boxes"})
    pixel_params = ("crop_size",)

    def __init__(self, params: ProbeParams, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self.backbone = nn.Linear(3 * 4 * 4, 8)
        self.backbone_target = make_target(self.backbone)

    def make_views(self, sample, rng):
        width, height = sample["image"].size
        source = View.identity(width, height)
        view = random_resized_crop(width, height, self.params.crop_size, rng, scale=(0.5, 1.0))
        image = torch.from_numpy(np.asarray(render_view(sample["image"], view), dtype=np.float32) / 255).permute(2, 0, 1)
        return {
            "image": image,  # (3, S, S)
            "boxes": torch.from_numpy(map_boxes(sample["boxes"], source, view)).float(),  # (K_i, 4) view px
            "grid": torch.from_numpy(_grid(view, 2)).float(),  # (4, 4) view px
            "points": torch.from_numpy(map_points([[width / 2, height / 2]], source, view)).float(),  # (1, 2)
        }

    def forward(self, batch, step_info: StepInfo):
        pooled = nn.functional.adaptive_avg_pool2d(batch["image"], 4).flatten(1)  # (B, 48)
        boxes_mean = (batch["boxes"] * batch["boxes_mask"][..., None]).sum((1, 2)) / 100  # (B,)
        out = self.backbone(pooled)  # (B, 8)
        loss = ((out - self.backbone_target(pooled).detach() - boxes_mean[:, None]) ** 2).mean()
        return {"loss": loss}

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_target)]

    def momentum_at(self, step_info):
        return self.params.momentum


def _sample(key: str, boxes: list) -> dict:
    pixels = np.random.default_rng(len(boxes)).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    return {"key": key, "image": Image.fromarray(pixels), "boxes": np.array(boxes, np.float32).reshape(-1, 4)}


def test_collation_pads_ragged_boxes_with_a_mask_and_keeps_annotations_in_view_pixels():
    method = InterfaceProbe(ProbeParams(), arch="none")
    samples = [_sample("a", [[0, 0, 10, 10]]), _sample("b", [[5, 5, 25, 20], [0, 0, 50, 40], [1, 2, 3, 4]])]
    rngs = [np.random.default_rng(i) for i in range(2)]
    views = [method.make_views(s, r) for s, r in zip(samples, rngs)]
    batch = method.collate(views)
    assert batch["boxes"].shape == (2, 3, 4) and batch["boxes_mask"].tolist() == [[True, False, False], [True] * 3]
    assert batch["grid"].shape == (2, 4, 4) and batch["points"].shape == (2, 1, 2)
    # The whole source image mapped into a view covers it (the crop lies inside the image).
    whole = batch["boxes"][1, 1]
    assert whole[0] <= 0 and whole[1] <= 0 and whole[2] >= CROP and whole[3] >= CROP
    # The mapping is geometry's: recompute sample "b"'s view from the same rng draws.
    view = random_resized_crop(50, 40, CROP, np.random.default_rng(1), scale=(0.5, 1.0))
    expected = map_boxes(samples[1]["boxes"], View.identity(50, 40), view)
    torch.testing.assert_close(batch["boxes"][1], torch.from_numpy(expected).float())
    torch.testing.assert_close(batch["points"][1], torch.from_numpy(map_points([[25, 20]], View.identity(50, 40), view)).float())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    path = tmp_path_factory.mktemp("shards") / "shard0.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as writer:
        for index in range(16):
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
            meta = {"width": 40, "height": 30, "boxes": [[1.0, 2.0, 20.0, 25.0]] * (index % 3 + 1)}
            writer.write({"__key__": f"img{index:03d}", "jpg": jpeg.getvalue(), "json": json.dumps(meta).encode()})
    return [path]


def test_two_accumulated_micro_batches_of_4_equal_one_batch_of_8(shards, tmp_path):
    run = {"method": "interface_probe", "method_params": {}, "arch": "none", "epochs": 2, "batch_size": 8,
           "num_workers": 0, "device": "cpu", "checkpoint_every_steps": 4, "log_every": 1}
    states = []
    for accumulate in (1, 2):
        workdir = tmp_path / f"accumulate{accumulate}"
        pretrain(PretrainSettings.from_dict({**run, "accumulate_steps": accumulate}), shards, workdir / "f.pt", workdir)
        states.append(torch.load(workdir / "checkpoint_00000004.pt", weights_only=False)["model"])
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(states[0]["backbone.weight"], states[0]["backbone_target.weight"])


def test_scaled_params_scales_every_view_size_together():
    scaled = InterfaceProbe.scaled_params(ProbeParams(momentum=0.5, crop_size=224), 64 / 224)
    assert scaled == ProbeParams(momentum=0.5, crop_size=64)


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_methods_never_import_the_engine_and_the_engine_imports_without_a_cycle():
    # Every registered method module (and what it imports) loads without regioncl.engine.
    methods = _fresh_python(
        "import sys, regioncl.methods as m; "
        "assert m.available_methods(), 'no method registered'; "
        "engine = sorted(n for n in sys.modules if n.startswith('regioncl.engine')); "
        "assert not engine, f'a method imports {engine}'"
    )
    assert methods.returncode == 0, methods.stderr
    # The engine first (it imports the methods' registry), in a fresh interpreter: no import cycle.
    engine = _fresh_python("import regioncl.engine.train; from regioncl.methods import get_method; get_method('moco_v2')")
    assert engine.returncode == 0, engine.stderr
