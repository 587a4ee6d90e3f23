"""PLRC: regions and points in both views (flips included) against the source grid, point features
against the upsampled map, the loss against the paper's eq. 1-6 recomputed pair by pair from the
method's own modules, the distillation warm-up, masking, the queue, and the engine (exact resume
across the warm-up switch, 1 vs 2 gloo processes, a short run that learns, converted weights
that finetune)."""

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw
from torch.nn import functional as F

from regioncl.engine import PretrainSettings, pretrain
from regioncl.geometry import View, cell_index, map_points
from regioncl.methods import StepInfo, get_method
from regioncl.methods.plrc import Plrc, PlrcParams

from pretrain_runs import (  # tests/pretrain_runs.py
    converted_weights_finetune,
    metric_values,
    newest_model_state,
    noise_image,
    spawn_two_ranks,
    stopped_and_resumed_run_equals_straight_run,
    views_batch,
    write_image_shard,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CROP = 64  # toy views: res5 2 x 2, label map 16 x 16
TINY = {"crop_size": CROP, "resolution": 16, "num_regions": 4, "num_points": 4, "hidden_dim": 32, "queue_size": 16}
BEFORE, AFTER = (StepInfo(step=0, epoch=e, steps_per_epoch=1, total_steps=40, seed=0) for e in (0, 30))


def _method(**overrides) -> Plrc:
    torch.manual_seed(0)
    return Plrc(PlrcParams(**{**TINY, **overrides}), arch="resnet18")


def _image(seed: int, width: int = 120, height: int = 90) -> Image.Image:
    return noise_image(seed, width, height)


def _batch(method: Plrc, size: int, seed: int = 0) -> dict:
    return views_batch(method, size, seed, _image)


def test_registry_and_the_papers_defaults():
    assert get_method("plrc") is Plrc
    p = PlrcParams()
    assert (p.grid, p.num_regions, p.num_points, p.resolution, p.crop_size, p.crop_scale) == (4, 16, 16, 56, 224, (0.2, 1.0))
    assert (p.alpha, p.beta, p.student_temperature, p.teacher_temperature, p.distill_warmup_epochs) == (0.5, 0.7, 0.1, 0.07, 30)
    assert (p.temperature, p.point_temperature, p.queue_size, p.momentum, p.feature_dim) == (0.2, 0.2, 65536, 0.999, 128)
    assert (p.image_embedding, p.point_negatives, p.shuffle_bn, p.chunk_size) == ("pooled", "global", True, None)
    assert Plrc.scaled_params(p, 0.5).resolution == 28 and Plrc.scaled_params(p, 0.5).crop_size == 112
    parsed = PretrainSettings.from_dict({"method": "plrc", "epochs": 16, "method_params": {"distill_warmup_epochs": 3}})
    assert parsed.method_params == PlrcParams(distill_warmup_epochs=3)


# -- geometry ------------------------------------------------------------------------------------


def _released_label_map(view: View, width: int, height: int, side: int, n: int) -> np.ndarray:
    """Each R x R pixel centre's cell of the n x n source grid, from the crop box and flip directly."""
    x1, y1, x2, y2 = view.crop
    u = (np.arange(side) + 0.5) / side
    u = 1 - u if view.flip else u
    xs, ys = x1 + u * (x2 - x1), y1 + (np.arange(side) + 0.5) / side * (y2 - y1)
    cols, rows = np.minimum(np.floor(xs * n / width), n - 1), np.minimum(np.floor(ys * n / height), n - 1)
    return (rows[:, None] * n + cols[None, :]).reshape(-1).astype(np.int64)


def test_label_maps_are_the_source_grid_warped_into_each_view_flips_included():
    method = _method(crop_size=224, resolution=56)
    flips = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        width, height = int(rng.integers(100, 500)), int(rng.integers(100, 500))
        geo = method.geometry(width, height, rng)
        for view in (geo.query, geo.key):
            flips.add(view.flip)
            expected = _released_label_map(view, width, height, 56, 4)
            np.testing.assert_array_equal(method.label_map(view, View.identity(width, height)), expected)
    assert flips == {False, True}


def test_points_lie_in_their_region_in_both_views_and_map_to_the_same_source_point():
    method = _method(crop_size=224, resolution=56, num_regions=16, num_points=16)
    flips, invalid, teacher_rows = set(), 0, 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        width, height = int(rng.integers(100, 640)), int(rng.integers(100, 640))
        geo = method.geometry(width, height, rng)
        source = View.identity(width, height)
        flips.update({geo.query.flip, geo.key.flip})
        if not geo.valid:
            invalid += 1
            assert not geo.distill_mask.any()
            continue
        labels = np.repeat(geo.regions, 16)
        for points, view in ((geo.points_query, geo.query), (geo.points_key, geo.key)):
            assert points.shape == (256, 2)
            in_source = map_points(points, view, source)
            np.testing.assert_array_equal(cell_index(in_source, source.crop, 4), labels)
            pixel = points * 56 / 224 - 0.5  # pixel centres of the R x R map
            np.testing.assert_allclose(pixel, np.round(pixel), atol=1e-9)
        # The teacher's points: the query points located in the key view, one source point each.
        np.testing.assert_allclose(
            map_points(geo.points_query_in_key, geo.key, source), map_points(geo.points_query, geo.query, source), rtol=1e-6
        )
        inside = (geo.points_query_in_key >= 0).all(axis=1) & (geo.points_query_in_key <= 224).all(axis=1)
        np.testing.assert_array_equal(geo.distill_mask, inside)
        teacher_rows += int(inside.sum())
    assert flips == {False, True} and teacher_rows > 0
    assert invalid < 10  # "happens rarely in practice" [P sec. 4.1]


def test_views_whose_crops_share_no_region_give_an_invalid_image_with_finite_placeholders():
    method = _method(grid=2)
    source_w, source_h = 200, 100
    left = View(crop=(0.0, 0.0, 90.0, 90.0), out_w=CROP, out_h=CROP)
    right = View(crop=(110.0, 0.0, 200.0, 90.0), out_w=CROP, out_h=CROP, flip=True)
    source = View.identity(source_w, source_h)
    labels = [np.unique(method.label_map(v, source)) for v in (left, right)]
    assert labels[0].tolist() == [0, 2] and labels[1].tolist() == [1, 3]  # no common region
    geo = method.regions_and_points(left, right, source, np.random.default_rng(0))
    assert not geo.valid and not geo.distill_mask.any()
    assert np.isfinite(geo.points_query).all() and np.isfinite(geo.points_key).all()
    touching = View(crop=(80.0, 0.0, 170.0, 90.0), out_w=CROP, out_h=CROP)  # shares cells 1 and 3 with ``right``
    geo = method.regions_and_points(touching, right, source, np.random.default_rng(0))
    assert geo.valid and set(geo.regions.tolist()) <= {1, 3}


def test_make_views_replay_the_geometry_and_are_determined_by_the_rng():
    method = _method()
    image = _image(3)
    views = method.make_views({"key": "a", "image": image}, np.random.default_rng(5))
    again = method.make_views({"key": "a", "image": image}, np.random.default_rng(5))
    assert all(torch.equal(views[k], again[k]) for k in views)
    geo = method.geometry(*image.size, np.random.default_rng(5))  # the first draws of make_views
    assert views["query"].shape == views["key"].shape == (3, CROP, CROP)
    torch.testing.assert_close(views["points_query"], torch.from_numpy(geo.points_query).float())
    torch.testing.assert_close(views["points_query_in_key"], torch.from_numpy(geo.points_query_in_key).float())
    assert torch.equal(views["labels"], torch.from_numpy(np.repeat(geo.regions, 4)))
    assert bool(views["regions_valid"]) == geo.valid and torch.equal(views["distill_mask"], torch.from_numpy(geo.distill_mask))


def test_point_features_at_pixel_centres_are_the_bilinearly_upsampled_map():
    method = _method()
    maps = torch.randn(2, 8, 2, 2, dtype=torch.float64)
    upsampled = F.interpolate(maps, size=(16, 16), mode="bilinear", align_corners=False)  # (2, 8, R, R)
    pixels = torch.tensor([[[0, 0], [15, 15], [3, 9]], [[15, 0], [7, 8], [0, 15]]])  # (B, K, 2) x, y
    points = (pixels.double() + 0.5) * CROP / 16
    expected = torch.stack([upsampled[b, :, pixels[b, :, 1], pixels[b, :, 0]].T for b in range(2)])
    torch.testing.assert_close(method.sample_points(maps, points), F.normalize(expected, dim=-1))


# -- the loss ------------------------------------------------------------------------------------


def _bilinear(feature: torch.Tensor, point: torch.Tensor, size: int) -> torch.Tensor:
    """(D, h, w) map at one x, y view px: bilinear between cell centres, clamped at the border; L2-normalized."""
    h, w = feature.shape[1:]
    fx = min(max(float(point[0]) * w / size - 0.5, 0.0), w - 1.0)
    fy = min(max(float(point[1]) * h / size - 0.5, 0.0), h - 1.0)
    x0, y0 = int(math.floor(fx)), int(math.floor(fy))
    x1, y1, ax, ay = min(x0 + 1, w - 1), min(y0 + 1, h - 1), fx - x0, fy - y0
    value = (
        feature[:, y0, x0] * (1 - ax) * (1 - ay) + feature[:, y0, x1] * ax * (1 - ay)
        + feature[:, y1, x0] * (1 - ax) * ay + feature[:, y1, x1] * ax * ay
    )  # fmt: skip
    return F.normalize(value.double(), dim=0)


def _expected_loss(method: Plrc, batch: dict, queue: torch.Tensor, distill: bool) -> dict[str, torch.Tensor]:
    """Eq. 1-6 pair by pair in float64, from the method's own modules (one process)."""
    p = method.params
    with torch.no_grad():
        z, dense_q = method.encode(batch["query"], method.backbone, method.head)
        z_k, dense_k = method.encode(batch["key"], method.backbone_k, method.head_k)
    images, count = batch["labels"].shape
    q = torch.stack([torch.stack([_bilinear(dense_q[b], pt, CROP) for pt in batch["points_query"][b]]) for b in range(images)])
    k = torch.stack([torch.stack([_bilinear(dense_k[b], pt, CROP) for pt in batch["points_key"][b]]) for b in range(images)])
    t = torch.stack([torch.stack([_bilinear(dense_k[b], pt, CROP) for pt in batch["points_query_in_key"][b]]) for b in range(images)])
    valid, labels = batch["regions_valid"], batch["labels"]
    contrast = torch.cat([k[b] for b in range(images) if valid[b]])  # every valid image's key points
    image_terms = []
    for b in range(images):
        logits = torch.cat([(z[b] @ z_k[b]).reshape(1), queue @ z[b]]).double() / p.temperature
        image_terms.append(torch.logsumexp(logits, 0) - logits[0])
    point_terms, distill_terms = [], []
    for b in range(images):
        if not valid[b]:
            continue
        pairs = []
        for i in range(count):
            lse = torch.logsumexp(contrast @ q[b, i] / p.point_temperature, 0)
            pairs += [lse - q[b, i] @ k[b, j] / p.point_temperature for j in range(count) if labels[b, i] == labels[b, j]]
        point_terms.append(torch.stack(pairs).mean())  # 1 / C_b over the image's positive pairs
        rows = [
            -(torch.softmax(contrast @ t[b, i] / p.teacher_temperature, 0) * torch.log_softmax(contrast @ q[b, i] / p.student_temperature, 0)).sum()
            for i in range(count) if batch["distill_mask"][b, i]
        ]  # fmt: skip
        if rows:
            distill_terms.append(torch.stack(rows).mean())
    image_loss, point_loss = torch.stack(image_terms).mean(), torch.stack(point_terms).mean()
    distill_loss = torch.stack(distill_terms).mean() if distill else torch.zeros((), dtype=torch.float64)
    total = p.beta * (p.alpha * point_loss + (1 - p.alpha) * distill_loss) + (1 - p.beta) * image_loss
    return {"loss": total, "loss_image": image_loss, "loss_point": point_loss, "loss_distill": distill_loss}


@pytest.mark.parametrize("step", [BEFORE, AFTER], ids=["warm-up", "distilling"])
def test_loss_is_eq_1_to_6_recomputed_pair_by_pair(step):
    method = _method()
    batch = _batch(method, 4)
    batch["regions_valid"][2] = False  # one image without a common region: out of the point losses and the contrast set
    batch["distill_mask"][2] = False
    assert int(batch["distill_mask"].sum()) >= 8 and batch["regions_valid"].sum() == 3
    queue = method.queue.features.clone()
    expected = _expected_loss(method, batch, queue, distill=step is AFTER)
    actual = method(batch, step)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value, rtol=2e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # The pairing matters: another image's key points, or the key points of another region, give another loss.
    swapped = {**batch, "points_key": batch["points_key"].roll(1, dims=0)}
    assert not torch.allclose(_expected_loss(method, swapped, queue, True)["loss_point"], expected["loss_point"], rtol=1e-3)
    relabelled = {**batch, "labels": batch["labels"].roll(1, dims=1)}
    other = method(relabelled, step)["loss_point"]
    assert not torch.allclose(other.double(), expected["loss_point"], rtol=1e-3)


def test_distillation_is_zero_without_gradient_before_the_warm_up_and_on_after_it():
    method = _method(distill_warmup_epochs=2)
    batch = _batch(method, 4)
    keys = None
    for epoch, on in ((0, False), (1, False), (2, True), (5, True)):
        losses = copy.deepcopy(method)(batch, StepInfo(step=0, epoch=epoch, steps_per_epoch=1, total_steps=9, seed=0))
        keys = keys or set(losses)
        assert set(losses) == keys and "loss_distill" in keys  # the same keys on every step
        if on:
            assert losses["loss_distill"].item() > 0 and losses["loss_distill"].requires_grad
        else:
            assert losses["loss_distill"].item() == 0.0 and not losses["loss_distill"].requires_grad
            expected = 0.35 * losses["loss_point"] + 0.3 * losses["loss_image"]
            torch.testing.assert_close(losses["loss"], expected)


def test_chunked_similarities_give_the_same_loss_and_gradients():
    method = _method()
    chunked = copy.deepcopy(method)
    chunked.params = PlrcParams(**{**TINY, "chunk_size": 5})
    batch = _batch(method, 3)
    plain, split = method(batch, AFTER), chunked(batch, AFTER)
    for key in plain:
        torch.testing.assert_close(split[key], plain[key], rtol=1e-5, atol=1e-6)
    plain["loss"].backward()
    split["loss"].backward()
    for (name, p), q in zip(method.named_parameters(), chunked.parameters()):
        if p.requires_grad:
            assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-9, name


def test_masked_images_and_teacher_rows_change_nothing():
    method = _method()
    batch = _batch(method, 4)
    batch["regions_valid"][1] = False
    batch["distill_mask"][1] = False
    batch["distill_mask"][0, :5] = False
    garbage = dict(batch)
    generator = torch.Generator().manual_seed(0)
    for name in ("points_query", "points_key", "points_query_in_key"):
        garbage[name] = batch[name].clone()
        garbage[name][1] = torch.rand(16, 2, generator=generator) * 3 * CROP - CROP  # in and out of the view
    garbage["points_query_in_key"][0, :5] = -7.0
    garbage["labels"] = batch["labels"].clone()
    garbage["labels"][1] = torch.arange(16)
    twin = copy.deepcopy(method)
    plain, extra = method(batch, AFTER), twin(garbage, AFTER)
    for key in ("loss", "loss_image", "loss_point", "loss_distill"):
        torch.testing.assert_close(extra[key], plain[key], rtol=1e-6, atol=1e-7)
    plain["loss"].backward()
    extra["loss"].backward()
    for (name, p), q in zip(method.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert (q.grad - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-9, name


def test_a_batch_without_any_valid_point_gives_the_image_loss_and_finite_gradients_everywhere():
    method = _method(distill_warmup_epochs=0)
    batch = _batch(method, 4)
    batch["regions_valid"][:] = False
    batch["distill_mask"][:] = False
    losses = method(batch, AFTER)
    assert losses["loss_point"].item() == losses["loss_distill"].item() == 0.0
    assert losses["loss"].item() == pytest.approx(0.3 * losses["loss_image"].item(), rel=1e-6)
    losses["loss"].backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)


def test_queue_advances_by_the_batch_and_gradients_reach_only_the_online_modules():
    method = _method(image_embedding="dense_mean")
    batch = _batch(method, 4)
    method(batch, AFTER)["loss"].backward()
    assert int(method.queue.pointer) == 4
    with torch.no_grad():
        keys = method.encode(batch["key"], method.backbone_k, method.head_k)[0]
    torch.testing.assert_close(method.queue.features[:4], keys)
    online = {id(p) for module, _ in method.momentum_pairs() for p in module.parameters()}
    assert online == {id(p) for p in method.parameters() if p.requires_grad}
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)
    backbone, extra = method.transfer_state()
    result = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == [] and extra == {}


# -- through the engine -------------------------------------------------------------------------

RUN = {
    "method": "plrc",
    "method_params": {**TINY, "momentum": 0.99, "distill_warmup_epochs": 1},
    "arch": "resnet18",
    "epochs": 2,
    "batch_size": 4,  # 12 images -> 3 steps per epoch; distillation from step 4
    "warmup_epochs": 1,
    "num_workers": 0,
    "seed": 3,
    "checkpoint_every_steps": 2,
    "log_every": 1,
    "device": "cpu",
}


def test_stopped_before_the_warm_up_switch_and_resumed_past_it_ends_bitwise_equal(shards, tmp_path, capsys):
    # stopped at step 2, in epoch 0: no distillation yet; resumed past the switch
    straight, expected = stopped_and_resumed_run_equals_straight_run(PretrainSettings.from_dict(RUN), shards, tmp_path, capsys)
    distill = metric_values(straight, "loss_distill")
    assert distill[:3] == [0.0, 0.0, 0.0] and all(value > 0 for value in distill[3:])
    assert int(expected["queue.pointer"]) == (6 * 4) % 16
    assert torch.load(straight / "final.pt", weights_only=True)["method"] == "plrc"


@pytest.mark.slow  # ~40 s: a 1-process run and a 2-process spawn
def test_two_gloo_processes_agree_with_one_on_the_first_steps(shards, tmp_path):

    # SyncBN instead of shuffle-BN: BN statistics over the same global batch in both runs;
    # distillation from the first step, so every loss is compared.
    params = {**RUN["method_params"], "shuffle_bn": False, "distill_warmup_epochs": 0}
    run = {**RUN, "epochs": 1, "sync_bn": True, "method_params": params}
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(PretrainSettings.from_dict(run), shards, one / "final.pt", one)
    spawn_two_ranks(run, shards, two)
    for key in ("loss", "loss_image", "loss_point", "loss_distill", "point_images", "distill_points"):
        assert metric_values(two, key)[0] == pytest.approx(metric_values(one, key)[0], abs=1e-5), key
    assert metric_values(two)[1] == pytest.approx(metric_values(one)[1], rel=1e-4)
    assert int(newest_model_state(two)["queue.pointer"]) == int(newest_model_state(one)["queue.pointer"]) == (3 * 4) % 16


def _shapes_image(rng: np.random.Generator) -> Image.Image:
    """A 96 px image of coloured squares on a coloured ground: regions that differ within an image."""
    image = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        (x, y), side = rng.integers(0, 72, 2), int(rng.integers(16, 48))
        draw.rectangle([int(x), int(y), int(x) + side, int(y) + side], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


@pytest.mark.slow  # ~2 min: 24 steps of 8 images at 96 px, then a 2-iteration finetune
def test_a_short_run_lowers_the_loss_and_its_converted_weights_finetune(tmp_path):
    rng = np.random.default_rng(0)
    shard = write_image_shard(tmp_path / "shapes.tar", [_shapes_image(rng) for _ in range(48)])
    params = {**RUN["method_params"], "crop_size": 96, "resolution": 24}
    run = {**RUN, "method_params": params, "epochs": 4, "batch_size": 8, "checkpoint_every_steps": 100,
           "optimizer": {"base_lr": 0.06, "reference_batch": 8}}  # fmt: skip
    pretrain(PretrainSettings.from_dict(run), [shard], tmp_path / "final.pt", tmp_path)
    assert all(math.isfinite(loss) for loss in metric_values(tmp_path))
    assert metric_values(tmp_path, "loss_distill")[-1] > 0  # the switch was reached

    # Held-out views against one fixed bank of image negatives (the logged image loss is against
    # a queue that fills with ever better keys); point contrasts are in-batch.
    held_out = [{"key": f"held{i}", "image": _shapes_image(np.random.default_rng(100 + i))} for i in range(16)]

    def evaluate(method: Plrc, batch: dict) -> dict[str, float]:
        method.queue.features.copy_(F.normalize(torch.randn(method.queue.features.shape, generator=torch.Generator().manual_seed(0)), dim=1))
        with torch.no_grad():
            return {key: float(value) for key, value in method(batch, AFTER).items()}

    torch.manual_seed(RUN["seed"])  # the engine's initial weights: seeded, then built
    initial = Plrc(PlrcParams(**params), arch="resnet18")
    batch = initial.collate([initial.make_views(s, np.random.default_rng(i)) for i, s in enumerate(held_out)])
    trained = Plrc(PlrcParams(**params), arch="resnet18")
    trained.load_state_dict(newest_model_state(tmp_path))
    before, after = evaluate(initial, batch), evaluate(trained, batch)
    # Measured: loss 4.01 -> 3.92, L_c 5.52 -> 5.41 (chance: log 256 = 5.55), L_a 5.77 -> 5.57. The
    # image loss against random negatives starts near its floor (untrained features all alike).
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert after["loss_point"] < before["loss_point"] - 0.05 and after["loss_distill"] < before["loss_distill"] - 0.1, (before, after)

    converted_weights_finetune(tmp_path / "final.pt", tmp_path, "plrc")
