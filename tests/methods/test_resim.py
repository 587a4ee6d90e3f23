"""ReSim: window pairs in both views (flips included) against the released mapping formula, the
loss against the paper's eq. 2-5 recomputed from the method's own modules, masking of windows,
the transferred modules, and the engine (exact resume, 1 vs 2 gloo processes, a short run on the
embedded data that learns, converted weights that finetune)."""

import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import webdataset as wds
from PIL import Image, ImageDraw
from torch.nn import functional as F

from regioncl.engine import PretrainSettings, pretrain
from regioncl.geometry import View, crop_intersection, map_boxes, render_view
from regioncl.methods import StepInfo, get_method
from regioncl.methods.resim import C4_LEVELS, FPN_LEVELS, RegionLevel, ResimC4, ResimFpn, ResimFpnParams, ResimParams
from regioncl.models.roi import precise_roi_pool

from pretrain_runs import (  # tests/pretrain_runs.py
    converted_weights_finetune,
    metric_values,
    newest_model_state,
    noise_image,
    spawn_two_ranks,
    stopped_and_resumed_run_equals_straight_run,
    views_batch,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CROP = 96  # toy views: C4 / P4 6 x 6, P3 12 x 12
TINY = {"crop_size": CROP, "hidden_dim": 32, "queue_size": 16}
STEP = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, seed=0)
TAU = 0.2


def _method(name: str = "resim_fpn", **overrides) -> ResimC4:
    torch.manual_seed(0)
    cls = get_method(name)
    return cls(cls.Params(**{**TINY, **overrides}), arch="resnet18")


def _image(seed: int, width: int = 150, height: int = 120) -> Image.Image:
    return noise_image(seed, width, height)


def _batch(method: ResimC4, size: int, seed: int = 0) -> dict:
    return views_batch(method, size, seed, _image)


def test_registry_names_both_variants_with_the_papers_defaults():
    assert get_method("resim_c4") is ResimC4 and get_method("resim_fpn") is ResimFpn
    c4, fpn = ResimParams(), ResimFpnParams()
    assert c4.levels == C4_LEVELS == (RegionLevel("c4", 48.0, 32.0, negative_kernel=3, gather_negatives=True),)
    assert fpn.levels == FPN_LEVELS == (RegionLevel("p4", 48.0, 32.0), RegionLevel("p3", 32.0, 24.0, gather_negatives=False))
    for p in (c4, fpn):
        assert (p.temperature, p.image_loss_weight, p.queue_size, p.momentum, p.feature_dim) == (0.2, 1.0, 65536, 0.999, 128)
        assert (p.crop_size, p.crop_scale, p.windows, p.projection, p.pool_aligned) == (224, (0.2, 1.0), "overlap", "conv", False)
    assert (fpn.fpn_channels, fpn.fpn_norm) == (256, "bn")
    assert PretrainSettings.from_dict({"method": "resim_fpn", "epochs": 1}).method_params == fpn
    parsed = PretrainSettings.from_dict(
        {"method": "resim_c4", "epochs": 1, "method_params": {"levels": [{"feature": "c4", "window": 64, "stride": 48}]}}
    )
    assert parsed.method_params.levels == (RegionLevel("c4", 64.0, 48.0),)


def test_levels_must_name_maps_of_the_variant():
    with pytest.raises(ValueError, match=r"resim_c4: levels: expected distinct features among \['c3', 'c4'\], got \['p4'\]"):
        _method("resim_c4", levels=(RegionLevel("p4"),))
    with pytest.raises(ValueError, match=r"resim_fpn: levels: .* got \['p4', 'p4'\]"):
        _method("resim_fpn", levels=(RegionLevel("p4"), RegionLevel("p4")))
    with pytest.raises(ValueError, match=r"resim_c4: crop_size 32 leaves c4 2 x 2 cells, fewer than its negative_kernel 3"):
        _method("resim_c4", crop_size=32)


def test_heads_are_the_papers_projection_and_moco_v2_mlp_and_the_fpn_reads_c3_to_c5():
    method = _method("resim_fpn", hidden_dim=None)
    assert [type(m).__name__ for m in method.projection["p4"]] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    first, last = method.projection["p3"][0], method.projection["p3"][-1]
    assert (first.kernel_size, first.in_channels, first.out_channels, last.out_channels) == ((3, 3), 256, 256, 128)
    assert [type(m).__name__ for m in method.head] == ["Linear", "ReLU", "Linear"] and method.head[0].out_features == 512
    assert (method.neck.in_levels, method.neck.out_levels) == ((3, 4, 5), (3, 4))
    released = _method("resim_fpn", projection="none", fpn_norm="none")
    assert all(isinstance(m, torch.nn.Identity) for m in released.projection.values())
    assert "inner_blocks.1.0.bias" in released.neck.state_dict()
    online = {id(p) for module, _ in method.momentum_pairs() for p in module.parameters()}
    assert online == {id(p) for p in method.parameters() if p.requires_grad}
    assert all(not p.requires_grad for _, target in method.momentum_pairs() for p in target.parameters())


# -- geometry ------------------------------------------------------------------------------------


def _to_source(boxes: np.ndarray, view: View) -> np.ndarray:
    """View px -> source px by the released anchor_mapping's step 1 (datasets.py), plus the flip."""
    l, t, r, b = view.crop
    x0, y0, x1, y1 = boxes.T
    if view.flip:  # a flipped view's column x is the crop's column out_w - x
        x0, x1 = view.out_w - x1, view.out_w - x0
    sx, sy = (r - l) / view.out_w, (b - t) / view.out_h
    return np.stack([sx * x0 + l, sy * y0 + t, sx * x1 + l, sy * y1 + t], axis=1)


@pytest.mark.parametrize("windows", ["overlap", "grid"])
@pytest.mark.parametrize("name", ["resim_c4", "resim_fpn"])
def test_every_window_pair_is_one_source_region_inside_both_views(name, windows):
    method = _method(name, crop_size=224, windows=windows)
    flips, kept, dropped = set(), 0, 0
    for seed in range(150):
        rng = np.random.default_rng(seed)
        width, height = int(rng.integers(160, 640)), int(rng.integers(160, 640))
        query, key = method.crops(width, height, rng)
        assert query.flip == key.flip
        flips.add(query.flip)
        source = View.identity(width, height)
        overlap = crop_intersection(query, key)
        for level in method.params.levels:
            pairs = method.window_pairs(query, key, source, level)
            in_query, in_key = pairs[:, 0], pairs[:, 1]
            np.testing.assert_allclose(_to_source(in_key, key), _to_source(in_query, query), rtol=1e-6)
            np.testing.assert_allclose(in_query[:, 2:] - in_query[:, :2], np.full((len(pairs), 2), level.window), rtol=1e-12)
            for boxes, view in ((in_query, query), (in_key, key)):
                assert (boxes[:, :2] >= -1e-6).all()
                assert (boxes[:, 2] <= view.out_w + 1e-6).all() and (boxes[:, 3] <= view.out_h + 1e-6).all()
            if windows == "overlap":  # on the stride lattice from the overlap's top-left corner, inside it
                corner = map_boxes(np.asarray(overlap)[None], source, query)[0] if overlap else None
                if len(pairs):
                    steps = (in_query[:, :2] - corner[:2]) / level.stride
                    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
                    assert (in_query[:, 2:] <= corner[2:] + 1e-6).all()
            else:  # the released grid: origin 0, ending before the last pixel; dropped when it leaves the key view
                candidates = 6 if level.window == 48 else 8
                dropped += candidates**2 - len(pairs)
                assert set(np.unique(in_query[:, :2])) <= set(level.stride * np.arange(candidates))
            kept += len(pairs)
    assert flips == {False, True} and kept > 0
    assert windows == "overlap" or dropped > 0


@pytest.mark.parametrize("windows", ["overlap", "grid"])
def test_identical_crops_keep_every_window_of_the_224_px_grid(windows):
    method = _method("resim_fpn", crop_size=224, windows=windows)
    view = View(crop=(10.0, 20.0, 330.0, 340.0), out_w=224, out_h=224, flip=True)
    source = View.identity(400, 400)
    counts = [len(method.window_pairs(view, view, source, level)) for level in method.params.levels]
    # P4: 48 px every 32 -> 6 x 6; P3: 32 px every 24 -> 9 x 9 over the whole view, 8 x 8 in the released grid
    assert counts == ([36, 81] if windows == "overlap" else [36, 64])


def test_a_painted_source_region_appears_inside_its_window_in_both_views():
    method = _method("resim_c4", crop_size=224)
    checked = 0
    for seed in range(20):
        width, height = 320, 256
        query, key = method.crops(width, height, np.random.default_rng(seed))
        source = View.identity(width, height)
        pairs = method.window_pairs(query, key, source, method.params.levels[0])
        if len(pairs) == 0:
            continue
        region = _to_source(pairs[:1, 0], query)[0]
        image = Image.new("RGB", (width, height))
        inside = [int(np.ceil(region[0])), int(np.ceil(region[1])), int(region[2]) - 1, int(region[3]) - 1]  # whole pixels
        ImageDraw.Draw(image).rectangle(inside, fill="white")
        for box, view in ((pairs[0, 0], query), (pairs[0, 1], key)):
            pixels = np.asarray(render_view(image, view).convert("L"), dtype=np.float64)
            margin = int(np.ceil(max(view.scale_x, view.scale_y))) + 1  # a source pixel, and the bilinear edge
            ys, xs = np.nonzero(pixels > 127)
            painted = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
            np.testing.assert_allclose(painted, box, atol=margin, err_msg=f"seed {seed}")
        checked += 1
    assert checked >= 10


def test_make_views_are_the_replayed_crops_window_pairs():
    method = _method("resim_fpn")
    image = _image(3)
    views = method.make_views({"key": "a", "image": image}, np.random.default_rng(5))
    again = method.make_views({"key": "a", "image": image}, np.random.default_rng(5))
    assert all(torch.equal(views[k], again[k]) for k in views)
    query, key = method.crops(*image.size, np.random.default_rng(5))  # the first draws of make_views
    assert views["query"].shape == views["key"].shape == (3, CROP, CROP)
    for level in method.params.levels:
        expected = method.window_pairs(query, key, View.identity(*image.size), level)
        torch.testing.assert_close(views[f"windows_{level.feature}"], torch.from_numpy(expected).float())


# -- the loss ------------------------------------------------------------------------------------


def _infonce(positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log(e^{p / tau} / (e^{p / tau} + sum_n e^{n / tau})) of one row, in float64."""
    logits = torch.cat([positive.reshape(1), negatives]).double() / TAU
    return torch.logsumexp(logits, 0) - logits[0]


def _expected_loss(method: ResimC4, batch: dict, queue: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 2-5 with their -log, window by window, from the method's own modules."""
    with torch.no_grad():
        q = method.encode(batch["query"], method.backbone, method.neck, method.projection, method.head)
        k = method.encode(batch["key"], method.backbone_k, method.neck_k, method.projection_k, method.head_k)
    image_terms = [_infonce(q["image"][i] @ k["image"][i], queue @ q["image"][i]) for i in range(len(q["image"]))]
    losses = {"loss_image": torch.stack(image_terms).mean()}
    for level in method.params.levels:
        name, size = level.feature, level.negative_kernel
        stride = 2 ** int(name[1:])
        keys = k[name]  # (B, D, h, w)
        h, w = keys.shape[-2:]
        negatives = torch.stack(  # every size x size average of every key map of the batch
            [
                F.normalize(keys[n, :, y : y + size, x : x + size].mean(dim=(1, 2)), dim=0)
                for n in range(len(keys))
                for y in range(h - size + 1)
                for x in range(w - size + 1)
            ]
        )
        terms = []
        windows, mask = batch[f"windows_{name}"], batch[f"windows_{name}_mask"]
        for b in range(len(windows)):
            for i in torch.nonzero(mask[b]).flatten():
                pooled = [
                    precise_roi_pool(maps[b : b + 1], windows[b, i, side].view(1, 1, 4), stride, aligned=False)[0, 0]
                    for side, maps in ((0, q[name]), (1, keys))
                ]
                r_q, r_k = (F.normalize(vector, dim=0) for vector in pooled)
                terms.append(_infonce(r_q @ r_k, negatives @ r_q))
        losses[f"loss_region_{name}"] = torch.stack(terms).mean()
    losses["loss"] = losses["loss_image"] + sum(losses[f"loss_region_{level.feature}"] for level in method.params.levels)
    return losses


@pytest.mark.parametrize("name", ["resim_c4", "resim_fpn"])
def test_loss_is_eq_2_to_5_recomputed_window_by_window(name):
    method = _method(name)
    batch = _batch(method, 4)
    assert all(int(batch[f"windows_{level.feature}_mask"].sum()) >= 4 for level in method.params.levels)
    queue = method.queue.features.clone()
    expected = _expected_loss(method, batch, queue)
    actual = method(batch, STEP)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].double(), value, rtol=2e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    keys = method.encode(batch["key"], method.backbone_k, method.neck_k, method.projection_k, method.head_k)["image"]
    torch.testing.assert_close(method.queue.features[:4], keys)
    # The pairing matters: the key windows of another image give another loss.
    swapped = dict(batch)
    for level in method.params.levels:
        swapped[f"windows_{level.feature}"] = batch[f"windows_{level.feature}"].clone()
        swapped[f"windows_{level.feature}"][:, :, 1] = batch[f"windows_{level.feature}"].roll(1, dims=0)[:, :, 1]
    assert not torch.allclose(_expected_loss(method, swapped, queue)["loss"], expected["loss"], rtol=1e-3)


def test_masked_windows_change_nothing():
    method = _method("resim_fpn")
    batch = _batch(method, 4)
    padded = dict(batch)
    for level in method.params.levels:
        windows, mask = batch[f"windows_{level.feature}"], batch[f"windows_{level.feature}_mask"]
        garbage = torch.rand(4, 3, 2, 4) * CROP
        garbage[..., 2:] += garbage[..., :2]  # valid boxes, some reaching out of the view: ignored all the same
        padded[f"windows_{level.feature}"] = torch.cat([windows, garbage], dim=1)
        padded[f"windows_{level.feature}_mask"] = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    twin = copy.deepcopy(method)
    plain, extra = method(batch, STEP), twin(padded, STEP)
    assert set(plain) == set(extra)
    for key in plain:
        torch.testing.assert_close(extra[key], plain[key], rtol=1e-6, atol=1e-7)
    plain["loss"].backward()
    extra["loss"].backward()
    for (name, p), q in zip(method.named_parameters(), twin.parameters()):
        if p.requires_grad:  # up to float rounding (wider matrix products sum in another order)
            assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-9, name


@pytest.mark.parametrize("width", [0, 3])  # no window slot at all; slots that are all masked
def test_a_batch_without_valid_windows_gives_the_image_loss_and_gradients_for_every_parameter(width):
    method = _method("resim_fpn")
    batch = _batch(method, 4)
    for level in method.params.levels:
        batch[f"windows_{level.feature}"] = torch.zeros(4, width, 2, 4)
        batch[f"windows_{level.feature}_mask"] = torch.zeros(4, width, dtype=torch.bool)
    losses = method(batch, STEP)
    assert losses["loss_region_p4"].item() == losses["loss_region_p3"].item() == 0.0
    assert losses["loss"].item() == losses["loss_image"].item() and math.isfinite(losses["loss"].item())
    losses["loss"].backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)  # DDP sees every one used
    assert all(p.grad.abs().sum() == 0 for n, p in trainable if n.startswith("projection."))


def test_transfer_exports_the_resnet_and_for_resim_fpn_its_fpn_from_c3():
    backbone, extra = _method("resim_c4").transfer_state()
    result = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == [] and extra == {}
    _, extra = _method("resim_fpn").transfer_state()
    convs = {".".join(key.split(".")[:3]) for key in extra["fpn"]}
    assert convs == {"inner_blocks.1.0", "inner_blocks.1.1", "inner_blocks.2.0", "inner_blocks.2.1", "inner_blocks.3.0",
                     "inner_blocks.3.1", "layer_blocks.1.0", "layer_blocks.1.1", "layer_blocks.2.0", "layer_blocks.2.1"}  # fmt: skip


def test_fpn_checkpoint_converts_to_detectron2_laterals_3_to_5_and_outputs_3_4(tmp_path):
    from regioncl.convert import convert_checkpoint
    from regioncl.weights import write_pretrained_checkpoint

    backbone, transfer = _method("resim_fpn").transfer_state()
    write_pretrained_checkpoint(
        tmp_path / "final.pt", method="resim_fpn", arch="resnet18", steps=1, epochs=1, backbone=backbone, transfer=transfer, config={}
    )
    report = convert_checkpoint(tmp_path / "final.pt", tmp_path / "w.tv.pth", tmp_path / "w.d2.pkl")  # raises on any unmapped key
    d2 = pickle.loads((tmp_path / "w.d2.pkl").read_bytes())["model"]
    fpn = sorted(k for k in d2 if k.startswith("fpn_"))
    assert {k.split(".")[0] for k in fpn} == {"fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output3", "fpn_output4"}
    assert "fpn_lateral3.norm.running_var" in fpn and "fpn_output4.weight" in fpn
    tv = torch.load(tmp_path / "w.tv.pth", weights_only=True)["state_dict"]
    assert "backbone.fpn.inner_blocks.1.0.weight" in tv and "backbone.fpn.layer_blocks.2.1.weight" in tv
    assert all(k.endswith("num_batches_tracked") for k in report.dropped)


# -- through the engine -------------------------------------------------------------------------

RUN = {
    "method": "resim_fpn",
    "method_params": {"crop_size": 64, "hidden_dim": 32, "queue_size": 16, "momentum": 0.99},
    "arch": "resnet18",
    "epochs": 1,
    "batch_size": 4,  # 12 images -> 3 steps
    "warmup_epochs": 1,
    "num_workers": 0,
    "seed": 3,
    "checkpoint_every_steps": 2,
    "log_every": 1,
    "device": "cpu",
}


def test_resume_after_a_stop_ends_bitwise_equal_to_the_uninterrupted_run(shards, tmp_path, capsys):
    straight, expected = stopped_and_resumed_run_equals_straight_run(PretrainSettings.from_dict(RUN), shards, tmp_path, capsys)
    assert int(expected["queue.pointer"]) == (3 * 4) % 16
    final = torch.load(straight / "final.pt", weights_only=True)
    assert final["method"] == "resim_fpn" and set(final["transfer"]) == {"fpn"}


@pytest.mark.slow  # ~40 s (~100 s on loaded cores): a 1-process run and a 2-process spawn
def test_two_gloo_processes_agree_with_one_on_the_first_step(shards, tmp_path):

    # Both levels' negatives gathered (the paper keeps P3's per GPU, which by design depends on
    # the number of processes); cross-rank BN instead of shuffle-BN, as tests/test_engine.py.
    levels = [{"feature": "p4"}, {"feature": "p3", "window": 32, "stride": 24, "gather_negatives": True}]
    run = {**RUN, "epochs": 1, "sync_bn": True, "method_params": {**RUN["method_params"], "shuffle_bn": False, "levels": levels}}
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(PretrainSettings.from_dict(run), shards, one / "final.pt", one)
    spawn_two_ranks(run, shards, two)
    for key in ("loss", "loss_image", "loss_region_p4", "loss_region_p3", "windows_p3"):
        assert metric_values(two, key)[0] == pytest.approx(metric_values(one, key)[0], abs=1e-5), key
    assert newest_model_state(two)["queue.pointer"] == newest_model_state(one)["queue.pointer"]


def _embedded_images(directory: Path, count: int) -> list[Path]:
    """The embedded generator's unlabeled images (128 px, objects on photo crops), in key order."""
    from regioncl.data.embedded import EmbeddedSettings, generate_embedded

    generate_embedded(directory, EmbeddedSettings(seed=0, n_unlabeled=count, n_train=0, n_val=0, image_size=128))
    return sorted((directory / "unlabeled").glob("*.jpg"))


def _shard(paths: list[Path], out: Path) -> Path:
    with wds.TarWriter(str(out)) as writer:
        for path in paths:
            width, height = Image.open(path).size
            meta = json.dumps({"width": width, "height": height, "boxes": []}).encode()
            writer.write({"__key__": path.stem, "jpg": path.read_bytes(), "json": meta})
    return out


def _similarity_gaps(method: ResimFpn, batch: dict, name: str) -> tuple[float, float, float]:
    """The online encoder as both query and key encoder, on held-out views: (mean cosine of a
    query window with its key window minus the mean with the dense regions of its own key map,
    the same minus other images' regions, the embeddings' std over windows averaged over dims)."""
    with torch.no_grad():
        q = method.encode(batch["query"], method.backbone, method.neck, method.projection, method.head)[name]
        k = method.encode(batch["key"], method.backbone, method.neck, method.projection, method.head)[name]
    mask = batch[f"windows_{name}_mask"]
    region_q = method.pool(q, batch[f"windows_{name}"][:, :, 0], name)  # (B, K, D)
    region_k = method.pool(k, batch[f"windows_{name}"][:, :, 1], name)
    dense = F.normalize(F.avg_pool2d(k, 3, stride=1), dim=1).flatten(2)  # (B, D, cells)
    similarity = torch.einsum("bkd,ndc->bknc", region_q, dense).mean(-1)  # (B, K, B): mean over each image's cells
    own = torch.eye(len(q), dtype=torch.bool)[:, None, :].expand_as(similarity)
    positive = (region_q * region_k).sum(-1)
    own_gap = (positive - similarity[own].view(positive.shape))[mask].mean()
    other_gap = (positive[..., None] - similarity)[~own].view(*positive.shape, -1)[mask].mean()
    return float(own_gap), float(other_gap), float(region_q[mask].std(dim=0).mean())


@pytest.mark.slow  # ~70 s (~170 s on loaded cores): 30 steps of 16 images at 96 px, then a 2-iteration finetune
def test_a_short_run_on_embedded_images_learns_aligned_regions_and_its_weights_finetune_as_fpn_t(tmp_path):
    images = _embedded_images(tmp_path / "embedded", 64)
    shard = _shard(images[:48], tmp_path / "embedded.tar")
    # The FPN as the torchvision detector's (no norm, 16 channels), so ReSim-FPN^T loads there.
    params = {**TINY, "crop_size": 96, "queue_size": 64, "momentum": 0.99, "fpn_channels": 16, "fpn_norm": "none"}
    run = {**RUN, "method_params": params, "epochs": 10, "batch_size": 16, "warmup_epochs": 0, "checkpoint_every_steps": 100,
           "optimizer": {"base_lr": 0.03, "reference_batch": 16}}  # fmt: skip
    pretrain(PretrainSettings.from_dict(run), [shard], tmp_path / "final.pt", tmp_path / "work")
    assert all(math.isfinite(loss) for loss in metric_values(tmp_path / "work"))
    # The logged region losses fall over the run (the image term does not at this length: it
    # rises while the queue fills with the moving encoder's keys, as MoCo v2's does here).
    for name in ("p4", "p3"):
        logged = metric_values(tmp_path / "work", f"loss_region_{name}")
        first, last = sum(logged[:5]) / 5, sum(logged[-5:]) / 5
        print(f"{name}: logged region loss {first:.3f} -> {last:.3f}")
        assert last < first - 0.05, (name, first, last)

    # At this scale InfoNCE at tau 0.2 first rises (random features are smooth, so every
    # similarity starts near 0.7 and the spread grows before the ranking settles); what the
    # region loss teaches shows in the similarities: a window's own key region pulls ahead of
    # the other regions of its image (what only the region loss asks for) and stays ahead of
    # other images', on held-out images.
    held_out = [{"key": p.stem, "image": Image.open(p).convert("RGB")} for p in images[48:]]
    torch.manual_seed(RUN["seed"])  # the engine's initial weights: seeded, then built
    initial = ResimFpn(ResimFpnParams(**params), arch="resnet18")
    batch = initial.collate([initial.make_views(s, np.random.default_rng(i)) for i, s in enumerate(held_out)])
    trained = ResimFpn(ResimFpnParams(**params), arch="resnet18")
    trained.load_state_dict(newest_model_state(tmp_path / "work"))
    for name in ("p4", "p3"):
        own_before, other_before, _ = _similarity_gaps(initial, batch, name)
        own_after, other_after, spread = _similarity_gaps(trained, batch, name)
        print(f"{name}: gap to own regions {own_before:.3f} -> {own_after:.3f}, to other images' {other_before:.3f} -> {other_after:.3f}")
        assert own_after > own_before + 0.02 and other_after > other_before, (name, own_before, own_after, other_before, other_after)
        assert spread > 0.02, (name, spread)  # no collapse: region embeddings still differ across windows

    converted_weights_finetune(
        tmp_path / "final.pt", tmp_path, "resim_fpn", ("backbone.body.layer1.0.conv1.weight", "backbone.fpn.inner_blocks.1.0.weight")
    )
