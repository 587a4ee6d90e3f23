"""DUPR: the crops' intersection and its cell grid in both views (flips included), the loss
against the paper's formula (eq. 2-6), masking of pairs that do not intersect, the queues, and the
engine (exact resume, 1 vs 2 gloo processes, a short run that learns, converted weights that finetune)."""

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.nn import functional as F

from regioncl.engine import PretrainSettings, pretrain
from regioncl.geometry import View, crop_intersection, grid_cells, map_boxes, render_view
from regioncl.methods import StepInfo, get_method
from regioncl.methods.dupr import Dupr, DuprParams
from regioncl.models import gather
from regioncl.models.multilevel import STAGES

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

# Tiny: 64 px crops, S = 4 on C4 and 2 on C5 (the paper's 14 / 7 at 224 px, scaled).
TINY = {"crop_size": 64, "roi_sizes": (16, 8, 4, 2), "hidden_dim": 32, "patch_hidden_dim": 32}
STEP = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, seed=0)
ALPHA = dict(zip(STAGES, (0.1, 0.4, 0.7, 1.0)))
TAU = 0.2


def _method(queue_size: int = 32, **overrides) -> Dupr:
    torch.manual_seed(0)
    return Dupr(DuprParams(queue_size=queue_size, **{**TINY, **overrides}), arch="resnet18")


def _image(seed: int, width: int = 80, height: int = 64) -> Image.Image:
    return noise_image(seed, width, height)


def _batch(method: Dupr, size: int, seed: int = 0) -> dict:
    return views_batch(method, size, seed, _image)


def _moved_key_encoder(method: Dupr) -> Dupr:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        targets = [*method.backbone_k.parameters(), *method.contrast.heads_k.parameters(), *method.patch_heads_k.parameters()]
        for parameter in targets:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return method


def test_registry_names_dupr_and_its_paper_defaults():
    assert get_method("dupr") is Dupr
    p = DuprParams()
    assert (p.image_weights, p.patch_weights, p.roi_sizes[2:], p.enqueue_cells) == ((0.1, 0.4, 0.7, 1.0), (0, 0, 1, 1), (14, 7), 4)
    assert (p.crop_size, p.crop_scale, p.temperature, p.queue_size, p.momentum) == (224, (0.2, 1.0), 0.2, 65536, 0.999)
    method = Dupr(p, arch="resnet18")
    assert set(method.patch_queues) == {"c4", "c5"} and len(method.contrast.queues["global"]) == 4  # 6 queues


def test_make_views_are_determined_by_the_rng():
    method = _method()
    first, again = (method.make_views({"key": "a", "image": _image(1)}, np.random.default_rng(7)) for _ in range(2))
    assert {k: tuple(v.shape) for k, v in first.items()} == {
        "valid": (), "query": (3, 64, 64), "key": (3, 64, 64), "box_query": (4,), "box_key": (4,),
        "flip_query": (), "flip_key": (), "cells_c4": (4,), "cells_c5": (4,),
    }
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert len(set(first["cells_c4"].tolist())) == 4 and int(first["cells_c5"].max()) < 4


def _source_cells(box: np.ndarray, flip: bool, size: int, view: View, source: View) -> np.ndarray:
    """The source rectangles of the flipped-back RoIAlign bins of ``box`` (view px): (S*S, 4), cell (i, j) at i*S + j."""
    bins = grid_cells(box, size).reshape(size, size, 4)  # RoIAlign's bins in view orientation
    if flip:
        bins = bins[:, ::-1]  # column j of the flipped-back output is view column S-1-j
    return map_boxes(bins.reshape(-1, 4), view, source)


def test_cell_ij_is_the_same_source_rectangle_in_both_views_flips_included():
    method = _method(crop_size=224)
    flips = set()
    for seed in range(60):
        query, key, overlap = method.pair_geometry(300, 200, np.random.default_rng(seed))
        if overlap is None:
            continue
        views = method.make_views({"key": "x", "image": _image(0, 300, 200)}, np.random.default_rng(seed))
        source = View.identity(300, 200)
        expected = grid_cells(overlap, 7)  # the paper's pseudo object, cut into 7 x 7 in the source
        for name, view in (("query", query), ("key", key)):
            flips.add(view.flip)
            assert bool(views[f"flip_{name}"]) == view.flip
            box = views[f"box_{name}"].double().numpy()
            cells = _source_cells(box, view.flip, 7, view, source)
            np.testing.assert_allclose(cells, expected, rtol=1e-6, atol=1e-6 * 300)
    assert flips == {False, True}


def test_roi_aligned_rgb_views_over_the_intersection_flipped_back_give_equal_grids():
    # A linear ramp (R ~ x, G ~ y): bilinear resampling and RoIAlign reproduce it exactly up to uint8 rounding.
    ys, xs = np.mgrid[0:200, 0:300]
    ramp = Image.fromarray(np.stack([xs * 255 / 299, ys * 255 / 199, np.full_like(xs, 128.0)], axis=2).round().astype(np.uint8))
    method = _method(crop_size=96, min_overlap=16.0)
    compared = set()
    for seed in range(30):
        query, key, overlap = method.pair_geometry(300, 200, np.random.default_rng(seed))
        if overlap is None:
            continue
        grids = []
        for view in (query, key):
            pixels = torch.from_numpy(np.asarray(render_view(ramp, view), dtype=np.float32)).permute(2, 0, 1)[None]
            box = torch.from_numpy(map_boxes(overlap, View.identity(300, 200), view)).float()
            grids.append(method.patch_grid(pixels, box, torch.tensor([view.flip]), 4, 1)[0, :2])  # (2, 4, 4): R, G
        compared.add((query.flip, key.flip))
        torch.testing.assert_close(grids[0], grids[1], atol=2.5, rtol=0)  # in 0..255 units
        # Without the flip-back, a mirrored pair would compare cell (i, j) with (i, S-1-j).
        if query.flip != key.flip:
            assert (grids[0][0] - grids[1][0].flip(-1)).abs().max() > 10
    assert (False, True) in compared or (True, False) in compared


def test_crops_that_never_intersect_are_masked_after_the_redraws():
    image = _image(2, 400, 400)
    redrawn, once = _method(crop_scale=(0.01, 0.02)), _method(crop_scale=(0.01, 0.02), max_redraws=0)
    valid_redrawn = [bool(redrawn.make_views({"key": "a", "image": image}, np.random.default_rng(s))["valid"]) for s in range(40)]
    valid_once = [bool(once.make_views({"key": "a", "image": image}, np.random.default_rng(s))["valid"]) for s in range(40)]
    assert sum(valid_once) < sum(valid_redrawn) < 40  # re-drawing finds overlaps, but not always
    for seed in range(10):
        query, key, overlap = once.pair_geometry(400, 400, np.random.default_rng(seed))
        assert (overlap is None) == (crop_intersection(query, key) is None)


def _hand_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """Per row: log(exp(q.k / t) + sum_j exp(q.n_j / t)) - q.k / t (eq. 5 / 6 for one query)."""
    positive = (q * k).sum(dim=-1) / TAU
    negatives = q @ queue.T / TAU
    return torch.logsumexp(torch.cat([positive[..., None], negatives], dim=-1), dim=-1) - positive


def _embeddings(method: Dupr, batch: dict) -> dict:
    """From the method's own modules: image queries/keys per stage, patch grids (B, S, S, D) per patch stage."""
    out = {}
    with torch.no_grad():
        for side, view, backbone, heads, patch_heads in (
            ("q", "query", method.backbone, method.contrast.heads, method.patch_heads),
            ("k", "key", method.backbone_k, method.contrast.heads_k, method.patch_heads_k),
        ):
            maps = backbone.forward_stages(batch[view])
            for s in STAGES:
                out[side, "image", s] = F.normalize(heads["global"][s](maps[s].mean(dim=(2, 3))), dim=1)
            for s, size in (("c4", 4), ("c5", 2)):
                grid = method.patch_grid(maps[s], batch[f"box_{view}"], batch[f"flip_{view}"], size, 2 ** int(s[1]))
                out[side, "patch", s] = F.normalize(patch_heads[s](grid), dim=1).permute(0, 2, 3, 1)
    return out


def test_loss_is_the_papers_image_and_patch_terms_with_masked_pairs_ignored():
    method = _moved_key_encoder(_method())
    batch = _batch(method, 4)
    batch["valid"][1] = False  # a pair without intersection: no patch loss for image 1
    image_queues = {s: method.contrast.queues["global"][s].features.clone() for s in STAGES}
    patch_queues = {s: method.patch_queues[s].features.clone() for s in ("c4", "c5")}
    e = _embeddings(method, batch)
    losses = method(batch, STEP)
    image = sum(ALPHA[s] * _hand_info_nce(e["q", "image", s], e["k", "image", s], image_queues[s]).mean() for s in STAGES)
    torch.testing.assert_close(losses["loss_image"], image, rtol=1e-5, atol=1e-5)
    keep = [0, 2, 3]
    for s in ("c4", "c5"):  # beta = 1; the mean over the cells of the intersecting pairs
        patch = _hand_info_nce(e["q", "patch", s][keep], e["k", "patch", s][keep], patch_queues[s]).mean()
        torch.testing.assert_close(losses[f"loss_patch_{s}"], patch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["loss"], image + losses["loss_patch_c4"] + losses["loss_patch_c5"])
    # The pairing matters: cell (i, j) against the key grid's mirrored column is another number.
    mirrored = _hand_info_nce(e["q", "patch", "c4"][keep], e["k", "patch", "c4"][keep].flip(2), patch_queues["c4"]).mean()
    assert abs(float(mirrored - losses["loss_patch_c4"].detach())) > 1e-3


def test_patch_loss_lower_bound_at_a_perfect_match():
    # eq. 5 for one cell with k = q and every negative = -q: log(1 + K exp(-2 / tau)), the minimum.
    q = F.normalize(torch.randn(3, 8), dim=1)
    bound = _hand_info_nce(q, q, -q[:1].expand(5, 8))[0]
    torch.testing.assert_close(bound, torch.log1p(5 * torch.exp(torch.tensor(-2 / TAU))))


def test_no_intersecting_pair_gives_zero_patch_loss_finite_gradients_and_no_enqueue():
    method = _method()
    batch = _batch(method, 3)
    batch["valid"][:] = False
    losses = method(batch, STEP)
    assert float(losses["loss_patch_c4"].detach()) == float(losses["loss_patch_c5"].detach()) == 0.0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in method.patch_heads.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)
    assert all(int(q.pointer) == 0 for q in method.patch_queues.values())
    assert all(int(q.pointer) == 3 for q in method.contrast.queues["global"].values())


def test_queues_advance_by_the_global_batch_and_patch_queues_by_four_cells_per_image():
    method = _moved_key_encoder(_method(queue_size=40))
    batch = _batch(method, 4)
    assert bool(batch["valid"].all())
    keys = _embeddings(method, batch)
    with torch.no_grad():
        method(batch, STEP)
    for s in STAGES:
        assert int(method.contrast.queues["global"][s].pointer) == 4
        torch.testing.assert_close(method.contrast.queues["global"][s].features[:4], keys["k", "image", s], rtol=1e-5, atol=1e-6)
    for s, size in (("c4", 4), ("c5", 2)):
        assert int(method.patch_queues[s].pointer) == 4 * 4
        grid = keys["k", "patch", s].flatten(1, 2)  # (B, S*S, D)
        expected = torch.stack([grid[b, batch[f"cells_{s}"][b]] for b in range(4)]).flatten(0, 1)
        torch.testing.assert_close(method.patch_queues[s].features[:16], expected, rtol=1e-5, atol=1e-6)


def test_nothing_variable_length_is_all_gathered(monkeypatch):
    shapes = []
    original = gather.all_gather_no_grad
    monkeypatch.setattr(gather, "all_gather_no_grad", lambda tensor: (shapes.append(tuple(tensor.shape)), original(tensor))[1])
    method = _method()
    first, second = _batch(method, 4, seed=0), _batch(method, 4, seed=9)
    second["valid"][:2] = False  # fewer pairs to enqueue: the gathers keep their shapes
    with torch.no_grad():
        method(first, STEP)
        recorded = list(shapes)
        shapes.clear()
        method(second, STEP)
    assert recorded == shapes and all(shape[0] == 4 for shape in recorded)


def test_transfer_state_is_the_online_backbone_loadable_into_torchvision():
    backbone, extra = _method().transfer_state()
    result = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == [] and extra == {}


# -- through the engine -------------------------------------------------------------------------

RUN = {
    "method": "dupr",
    "method_params": {**TINY, "queue_size": 32, "momentum": 0.99},
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


@pytest.mark.slow  # 20-60 s on 2 shared cores: three short runs writing full checkpoints
def test_resume_after_a_stop_ends_bitwise_equal_to_the_uninterrupted_run(shards, tmp_path, capsys):
    straight, expected = stopped_and_resumed_run_equals_straight_run(PretrainSettings.from_dict(RUN), shards, tmp_path, capsys)
    assert int(expected["contrast.queues.global.c2.pointer"]) == 3 * 4


@pytest.mark.slow  # ~80 s: a 1-process run and two 2-process spawns
def test_two_gloo_processes_agree_with_one_on_the_first_steps(shards, tmp_path):

    run = {**RUN, "sync_bn": True, "method_params": {**RUN["method_params"], "shuffle_bn": False}}
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(PretrainSettings.from_dict(run), shards, one / "final.pt", one)
    spawn_two_ranks(run, shards, two)
    assert metric_values(two)[0] == pytest.approx(metric_values(one)[0], abs=1e-5)
    assert metric_values(two)[1] == pytest.approx(metric_values(one)[1], rel=1e-4)
    for name in ("patch_queues.c4.pointer", "contrast.queues.global.c5.pointer"):
        assert newest_model_state(two)[name] == newest_model_state(one)[name]
    # Shuffle-BN across the two ranks (images with their boxes, flips and cells): trains, queues agree.
    shuffled = tmp_path / "shuffled"
    spawn_two_ranks(RUN, shards, shuffled)
    assert all(math.isfinite(loss) for loss in metric_values(shuffled))
    assert newest_model_state(shuffled)["patch_queues.c5.pointer"] == newest_model_state(one)["patch_queues.c5.pointer"]


@pytest.mark.slow  # ~80 s: 12 steps of 8 images, then a 2-iteration finetune
def test_a_short_run_lowers_the_loss_and_its_converted_weights_finetune(tmp_path):
    from test_detco import _shapes_image  # tests/methods/test_detco.py
    rng = np.random.default_rng(0)
    shard = write_image_shard(tmp_path / "shapes.tar", [_shapes_image(rng) for _ in range(48)])
    run = {**RUN, "epochs": 2, "batch_size": 8, "checkpoint_every_steps": 100, "optimizer": {"base_lr": 0.06, "reference_batch": 8}}
    pretrain(PretrainSettings.from_dict(run), [shard], tmp_path / "final.pt", tmp_path)
    # From step 5 on every queue holds real keys only (image queues: 4 steps of 8 keys; patch
    # queues: 1 step of 32 cells); from there the logged loss falls. (Measured against held-out
    # images, 12 steps are too few here: a random network already matches a cell with itself.)
    losses = metric_values(tmp_path)
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[4:7]) - 0.3, losses

    converted_weights_finetune(tmp_path / "final.pt", tmp_path, "dupr")
