"""The photometric augmentation rendered on the training device (``pretrain.photometric: device``)
against the PIL rendering in the workers: same draws, same geometry, pixels within 2/255."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from skimage import data as photos
from torch.utils.data import default_collate

from regioncl import augment
from regioncl.augment import BYOL_RECIPES, MOCO_V2_RECIPE, finish_views, photometric_batch, photometric_pil, view_output
from regioncl.data.shards import ShardStream
from regioncl.engine import PretrainSettings
from regioncl.engine.loader import ViewStream, make_loader, sample_rng
from regioncl.geometry import View, map_boxes
from regioncl.methods import available_methods, get_method

from pretrain_runs import stopped_and_resumed_run_equals_straight_run, write_shards  # tests/pretrain_runs.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

VIEW = 96  # px: views of real photos, small enough for a quick CPU test
TOLERANCE = 2 / 255  # mean absolute difference, [0, 1] pixel scale


def _photos(size: int = VIEW) -> list[Image.Image]:
    """Three photographs shipped with scikit-image, resized to ``size`` px squares."""
    return [Image.fromarray(p[:, :, :3]).resize((size, size)) for p in (photos.astronaut(), photos.chelsea(), photos.coffee())]


def _identity_table() -> np.ndarray:
    table = np.zeros(augment.PHOTOMETRIC_COLUMNS)
    table[[augment.BRIGHTNESS, augment.CONTRAST, augment.SATURATION]] = 1.0
    table[augment.ORDER] = np.arange(len(augment.JITTER_OPS))
    return table


def _with(**columns: float) -> np.ndarray:
    table = _identity_table()
    for name, value in columns.items():
        table[getattr(augment, name.upper())] = value
    return table


def _mean_abs_difference(images: list[Image.Image], tables: list[np.ndarray]) -> torch.Tensor:
    """Per view: mean |batched device painter - PIL painter| on the same tables, [0, 1] scale."""
    pil = torch.stack([F.pil_to_tensor(photometric_pil(image, table)) for image, table in zip(images, tables)]) / 255
    host = np.stack(tables)
    batch = torch.stack([F.pil_to_tensor(image) for image in images]) / 255
    device = photometric_batch(batch, torch.from_numpy(host), host)
    return (device - pil).abs().mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    "table",
    [
        _with(jitter=1, brightness=0.6), _with(jitter=1, brightness=1.4),
        _with(jitter=1, contrast=0.6), _with(jitter=1, contrast=1.4),
        _with(jitter=1, saturation=0.6), _with(jitter=1, saturation=1.4),
        _with(jitter=1, hue=-0.1), _with(jitter=1, hue=0.1),
        _with(grayscale=1),
        _with(blur=1, blur_sigma=0.5), _with(blur=1, blur_sigma=2.0), _with(blur=1, blur_sigma=4.0),
        _with(solarize=1),
    ],
    ids=[
        "brightness0.6", "brightness1.4", "contrast0.6", "contrast1.4", "saturation0.6", "saturation1.4",
        "hue-0.1", "hue0.1", "grayscale", "blur0.5", "blur2", "blur4", "solarize",
    ],
)  # fmt: skip
def test_each_op_batched_is_within_2_of_255_of_pil_on_the_same_parameters(table):
    images = _photos()
    assert _mean_abs_difference(images, [table] * len(images)).max() <= TOLERANCE


@pytest.mark.parametrize("recipe", [MOCO_V2_RECIPE, *BYOL_RECIPES], ids=["moco_v2", "byol1", "byol2"])
def test_full_recipe_batched_is_within_2_of_255_of_pil_on_the_same_draws(recipe):
    images = _photos() * 8
    rng = np.random.default_rng(0)
    tables = [augment.draw_photometric(recipe, rng, image.size) for image in images]
    difference = _mean_abs_difference(images, tables)
    # Measured: mean 1.4-1.6 / 255; single views up to ~3 / 255 (hue and blur after contrast).
    assert difference.mean() <= TOLERANCE and difference.max() <= 2 * TOLERANCE


def test_batched_hue_turn_equals_torchvisions_adjust_hue_per_image():
    batch = torch.stack([F.pil_to_tensor(image) for image in _photos(48)]) / 255
    factors = torch.tensor([-0.1, 0.03, 0.1])
    turned = augment._hue(batch, factors.view(-1, 1, 1, 1))
    expected = torch.stack([F.adjust_hue(image, float(f)) for image, f in zip(batch, factors)])
    assert (turned - expected).abs().max() < 1e-5


def test_batched_photometric_is_unchanged_under_the_engines_bf16_autocast():
    images = _photos(48)
    host = np.stack([_with(blur=1, blur_sigma=1.5), _with(jitter=1, contrast=1.3, grayscale=1), _with(solarize=1)])
    batch = torch.stack([F.pil_to_tensor(image) for image in images]) / 255
    plain = photometric_batch(batch, torch.from_numpy(host), host)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = photometric_batch(batch, torch.from_numpy(host), host)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_batched_jitter_follows_each_rows_own_order():
    image = _photos()[:1]
    forward, backward = _with(jitter=1, brightness=1.4, hue=0.1), _with(jitter=1, brightness=1.4, hue=0.1)
    backward[augment.ORDER] = backward[augment.ORDER][::-1]
    host = np.stack([forward, backward])
    batch = (torch.stack([F.pil_to_tensor(image[0])] * 2) / 255)
    out = photometric_batch(batch, torch.from_numpy(host), host)
    single = [photometric_batch(batch[:1], torch.from_numpy(t[None]), t[None]) for t in (forward, backward)]
    assert torch.equal(out[0], single[0][0]) and torch.equal(out[1], single[1][0])
    assert not torch.equal(out[0], out[1])  # brightness clamps before or after the hue turn


def test_normalising_a_uint8_batch_equals_torchvisions_normalize_of_each_view_bitwise():
    """So ``worker`` mode, normalising on the device, gives the floats it gave in the workers."""
    batch = torch.stack([F.pil_to_tensor(image) for image in _photos(40)])
    for view, finished in zip(batch, augment.normalize_views(batch)):
        expected = F.normalize(F.to_dtype(view, torch.float32, scale=True), list(augment.IMAGENET_MEAN), list(augment.IMAGENET_STD))
        assert torch.equal(finished, expected)


def _sample(seed: int = 0, width: int = 150, height: int = 110) -> dict:
    pixels = np.asarray(_photos(max(width, height))[seed % 3])[:height, :width]
    boxes = np.array([[10.0, 12.0, 90.0, 80.0], [40.0, 20.0, 140.0, 100.0], [5.0, 5.0, 60.0, 50.0]], dtype=np.float32)
    return {"key": f"img{seed:03d}", "image": Image.fromarray(pixels), "boxes": boxes, "width": width, "height": height}


def _make_views(method, sample: dict, mode: str, seed: int = 0) -> dict[str, torch.Tensor]:
    with view_output(mode):
        return method.make_views(sample, sample_rng(seed, 0, sample["key"]))


@pytest.fixture(scope="module")
def methods() -> dict:
    """Every method the package ships (not those tests register, which build views their own
    way) at R18 with its paper view parameters scaled to 64-px views and small heads and queues
    (they play no part in the views)."""
    built = {}
    for name in available_methods():
        cls = get_method(name)
        if not cls.__module__.startswith("regioncl.methods."):
            continue
        params = cls.scaled_params(cls.Params(), 64 / 224)
        small = {f.name: 16 for f in dataclasses.fields(params) if f.name.endswith(("queue_size", "hidden_dim"))}
        torch.manual_seed(0)
        built[name] = cls(dataclasses.replace(params, **small), arch="resnet18")
    return built


def test_every_method_draws_the_same_geometry_in_every_mode(methods):
    """Worker, device and plain calls take the same draws: every non-image output is equal, the
    worker's uint8 views finish to the plain call's floats bitwise, the device's within 2/255."""
    for name, method in methods.items():
        for seed in range(3):
            sample = _sample(seed)
            plain, worker, device = (_make_views(method, sample, mode) for mode in ("normalized", "worker", "device"))
            assert worker.keys() == plain.keys(), name
            finished_worker = finish_views(default_collate([worker]), host=default_collate([worker]))
            finished_device = finish_views(default_collate([device]), host=default_collate([device]))
            assert finished_device.keys() == plain.keys(), name
            for key, value in plain.items():
                if value.is_floating_point() and value.dim() >= 3 and value.shape[-3] == 3:  # an image
                    assert worker[key].dtype == device[key].dtype == torch.uint8, (name, key)
                    assert torch.equal(finished_worker[key][0], value), (name, key)
                    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
                    difference = ((finished_device[key][0] - value) * std).abs().mean()  # [0, 1] pixel scale
                    assert difference <= 2 * TOLERANCE, (name, key, difference * 255)
                else:
                    assert torch.equal(worker[key], value) and torch.equal(device[key], value), (name, key)


def test_device_mode_boxes_equal_geometry_map_boxes_exactly(methods):
    method = methods["dupr"]
    for seed in range(4):
        sample = _sample(seed)
        views = _make_views(method, sample, "device", seed=seed)
        query, key, overlap = method.pair_geometry(sample["width"], sample["height"], sample_rng(seed, 0, sample["key"]))
        assert overlap is not None
        source = View.identity(sample["width"], sample["height"])
        for name, view in (("query", query), ("key", key)):
            expected = torch.from_numpy(map_boxes(overlap[None], source, view)[0]).float()
            assert torch.equal(views[f"box_{name}"], expected)
            assert views[name].shape == (3, view.out_h, view.out_w)
        assert views["query_photometric"].shape == (augment.PHOTOMETRIC_COLUMNS,)


def test_detco_jigsaw_patches_are_cut_on_the_device_after_the_photometric(methods):
    method = methods["detco"]
    sample = _sample(1)
    device = _make_views(method, sample, "device")
    assert device["local_q"].dim() == 3 and device["local_q_patches"].shape == (method.params.grid**2, 4)
    finished = finish_views(default_collate([device]), host=default_collate([device]))
    plain = _make_views(method, sample, "normalized")
    assert finished["local_q"].shape == (1, *plain["local_q"].shape)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    assert ((finished["local_q"][0] - plain["local_q"]) * std).abs().mean() <= 2 * TOLERANCE


def _loader_items(shards: list[Path], workers: int, count: int) -> list[dict]:
    method_cls = get_method("moco_v2")
    method = method_cls(method_cls.Params(crop_size=32, queue_size=16, hidden_dim=32), arch="resnet18")
    views = ViewStream(ShardStream(shards, seed=5), method.make_views, seed=5, output="device")
    views.start_epoch(1, skip_samples=0)
    items = iter(make_loader(views, workers, seed=5, step_items=4))
    return [next(items) for _ in range(count)]


def test_a_sample_gets_the_same_views_and_parameters_with_0_and_2_workers(tmp_path):
    shards = write_shards(tmp_path)
    alone, pooled = _loader_items(shards, 0, 6), _loader_items(shards, 2, 6)
    for first, second in zip(alone, pooled):
        assert first.keys() == second.keys() == {"query", "key", "query_photometric", "key_photometric"}
        assert all(torch.equal(first[key], second[key]) for key in first)


def test_device_photometric_run_resumed_after_a_stop_equals_an_uninterrupted_one(tmp_path, capsys):
    run = PretrainSettings.from_dict({
        "method": "byol",
        "method_params": {"hidden_dim": 32, "feature_dim": 16, "crop_size": 32},
        "arch": "resnet18", "epochs": 2, "batch_size": 4, "num_workers": 2, "seed": 3,
        "checkpoint_every_steps": 2, "log_every": 1, "device": "cpu", "photometric": "device",
    })  # fmt: skip
    stopped_and_resumed_run_equals_straight_run(run, write_shards(tmp_path), tmp_path, capsys, stop=2)
