"""DetCo: jigsaw geometry, the loss against the paper's formula (eq. 1-5), queues, and the engine
(exact resume, 1 vs 2 gloo processes, a short run that learns, converted weights that finetune)."""

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw
from torch.nn import functional as F

from regioncl.augment import MOCO_V2_RECIPE, apply_photometric, to_normalized_tensor
from regioncl.engine import PretrainSettings, pretrain
from regioncl.geometry import View, map_boxes, render_view
from regioncl.methods import StepInfo, get_method
from regioncl.methods.detco import DetCo, DetCoParams
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

# Tiny views: global 32 px, local 48 px cut into 3 x 3 cells of 16 px, 12 px patches.
TINY = {"global_size": 32, "local_size": 48, "patch_size": 12, "global_hidden_dim": 32, "local_hidden_dim": 32}
STEP = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, seed=0)
WEIGHTS = dict(zip(STAGES, (0.1, 0.4, 0.7, 1.0)))


def _method(queue_size: int = 16, **overrides) -> DetCo:
    torch.manual_seed(0)
    return DetCo(DetCoParams(queue_size=queue_size, **{**TINY, **overrides}), arch="resnet18")


def _image(seed: int, width: int = 56, height: int = 48) -> Image.Image:
    return noise_image(seed, width, height)


def _batch(method: DetCo, size: int, seed: int = 0) -> dict:
    return views_batch(method, size, seed, _image)


def _moved_key_encoder(method: DetCo) -> DetCo:
    """Key backbone and heads moved off the online ones (they start equal): using the wrong
    encoder for a view changes the numbers."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in [*method.backbone_k.parameters(), *method.contrast.heads_k.parameters()]:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return method


def test_registry_names_detco_and_its_paper_defaults():
    assert get_method("detco") is DetCo
    p = DetCoParams()
    assert (p.global_size, p.global_scale, p.local_size, p.local_scale, p.grid, p.patch_size) == (
        224, (0.2, 1.0), 255, (0.6, 1.0), 3, 64,
    )
    assert (p.stage_weights, p.temperature, p.queue_size, p.momentum, p.feature_dim) == ((0.1, 0.4, 0.7, 1.0), 0.2, 65536, 0.999, 128)


def test_make_views_are_two_crops_and_two_nine_patch_sets_determined_by_the_rng():
    method = _method()
    first = method.make_views({"key": "a", "image": _image(1)}, np.random.default_rng(7))
    again = method.make_views({"key": "a", "image": _image(1)}, np.random.default_rng(7))
    assert {k: tuple(v.shape) for k, v in first.items()} == {
        "global_q": (3, 32, 32), "global_k": (3, 32, 32), "local_q": (9, 3, 12, 12), "local_k": (9, 3, 12, 12),
    }
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["local_q"], first["local_k"])
    hic_only = _method(cglc=False).make_views({"key": "a", "image": _image(1)}, np.random.default_rng(7))
    assert set(hic_only) == {"global_q", "global_k"}


def test_patch_j_lies_in_cell_j_in_source_coordinates_flips_included():
    method = _method(local_size=255, patch_size=64)  # the paper's 85 px cells
    source = View.identity(300, 200)
    flips = set()
    for seed in range(40):
        view, cells, patches = method.jigsaw_geometry(300, 200, np.random.default_rng(seed))
        flips.add(view.flip)
        assert (view.out_w, view.out_h) == (255, 255)
        np.testing.assert_allclose(cells[:, 2:] - cells[:, :2], 85.0)
        np.testing.assert_array_equal(patches[:, 2:] - patches[:, :2], 64.0)
        assert np.array_equal(patches, np.round(patches))  # whole pixels: a crop, no resampling
        cells_src, patches_src = map_boxes(cells, view, source), map_boxes(patches, view, source)
        tolerance = 1e-6 * 300
        assert (patches_src[:, :2] >= cells_src[:, :2] - tolerance).all()
        assert (patches_src[:, 2:] <= cells_src[:, 2:] + tolerance).all()
        # Row-major over the view: in a flipped view, column 0 is the rightmost source column.
        centers = (cells_src[:, 0] + cells_src[:, 2]).reshape(3, 3)
        assert (np.diff(centers, axis=1) < 0).all() if view.flip else (np.diff(centers, axis=1) > 0).all()
        assert (np.diff((cells_src[:, 1] + cells_src[:, 3]).reshape(3, 3), axis=0) > 0).all()
    assert flips == {False, True}


def test_patches_are_cut_at_the_geometry_boxes_after_the_photometric_recipe():
    method, image = _method(), _image(3, 80, 60)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        view, _, patches = method.jigsaw_geometry(*image.size, rng)
        local = apply_photometric(render_view(image, view), MOCO_V2_RECIPE, rng)
        expected = torch.stack([to_normalized_tensor(local.crop(tuple(int(v) for v in box))) for box in patches])
        assert torch.equal(method._local_set(image, np.random.default_rng(seed)), expected)
    shuffled = _method(patch_order="shuffled")._local_set(image, np.random.default_rng(0))
    grid = method._local_set(image, np.random.default_rng(0))
    assert not torch.equal(shuffled, grid) and torch.equal(shuffled.sort(dim=0).values, grid.sort(dim=0).values)


def _hand_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """eq. 2/4/5 in logsumexp form: mean_i [ log(exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) - q_i.k_i / t ]."""
    positive = (q * k).sum(dim=1) / temperature
    negatives = q @ queue.T / temperature
    return (torch.logsumexp(torch.cat([positive[:, None], negatives], dim=1), dim=1) - positive).mean()


def _embeddings(method: DetCo, batch: dict) -> dict:
    """q/k, global/local, per stage, from the method's own modules, with the paper's pooling and concatenation."""
    out = {}
    with torch.no_grad():
        for side, backbone, heads in (("q", method.backbone, method.contrast.heads), ("k", method.backbone_k, method.contrast.heads_k)):
            crops = backbone.forward_stages(batch[f"global_{side}"])
            patches = backbone.forward_stages(batch[f"local_{side}"].flatten(0, 1))  # (B*9, C, h, w), image-major
            for s in STAGES:
                pooled = patches[s].mean(dim=(2, 3))
                concatenated = torch.stack([torch.cat([pooled[b * 9 + j] for j in range(9)]) for b in range(len(crops[s]))])
                out[side, "g", s] = F.normalize(heads["global"][s](crops[s].mean(dim=(2, 3))), dim=1)
                out[side, "l", s] = F.normalize(heads["local"][s](concatenated), dim=1)
    return out


def test_loss_is_the_papers_weighted_sum_of_three_contrasts_with_the_right_queues():
    method = _moved_key_encoder(_method())
    batch = _batch(method, 4)
    queues = {(b, s): method.contrast.queues[b][s].features.clone() for b in ("global", "local") for s in STAGES}
    assert len(queues) == 8 and len({q.data_ptr() for q in queues.values()}) == 8
    e = _embeddings(method, batch)
    losses = method(batch, STEP)
    tau = 0.2
    terms = {
        "loss_gg": sum(WEIGHTS[s] * _hand_info_nce(e["q", "g", s], e["k", "g", s], queues["global", s], tau) for s in STAGES),
        # eq. 4: the local query against the global key and the global queue
        "loss_lg": sum(WEIGHTS[s] * _hand_info_nce(e["q", "l", s], e["k", "g", s], queues["global", s], tau) for s in STAGES),
        "loss_ll": sum(WEIGHTS[s] * _hand_info_nce(e["q", "l", s], e["k", "l", s], queues["local", s], tau) for s in STAGES),
    }
    for name, value in terms.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["loss"], sum(terms.values()), rtol=1e-5, atol=1e-5)
    # The formula tells the pairings apart: the local queue for the local<->global term is another number.
    wrong = sum(WEIGHTS[s] * _hand_info_nce(e["q", "l", s], e["k", "g", s], queues["local", s], tau) for s in STAGES)
    assert abs(float(wrong - terms["loss_lg"])) > 1e-3


def test_gradients_reach_the_backbone_and_all_eight_heads_but_no_momentum_copy():
    method = _method()
    method(_batch(method, 4), STEP)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.contrast.heads.parameters())
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    frozen = [*method.backbone_k.parameters(), *method.contrast.heads_k.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    online = sum(p.numel() for p in [*method.backbone.parameters(), *method.contrast.heads.parameters()])
    assert sum(p.numel() for _, target in method.momentum_pairs() for p in target.parameters()) == online


def test_each_queue_gets_its_keys_and_every_pointer_advances_by_the_global_batch():
    method = _moved_key_encoder(_method(queue_size=6))
    first, second = _batch(method, 4, seed=0), _batch(method, 4, seed=10)
    with torch.no_grad():
        method(first, STEP)
        keys = _embeddings(method, second)
        method(second, STEP)
    for branch, short in (("global", "g"), ("local", "l")):
        for s in STAGES:
            queue = method.contrast.queues[branch][s]
            assert int(queue.pointer) == (4 + 4) % 6
            torch.testing.assert_close(queue.features[[4, 5, 0, 1]], keys["k", short, s], rtol=1e-5, atol=1e-6)
    assert sum(name.endswith(".pointer") for name in method.state_dict()) == 8


def test_nothing_variable_length_is_all_gathered(monkeypatch):
    shapes = []
    original = gather.all_gather_no_grad

    def recording(tensor):
        shapes.append(tuple(tensor.shape))
        return original(tensor)

    monkeypatch.setattr(gather, "all_gather_no_grad", recording)
    method = _method()
    with torch.no_grad():
        method(_batch(method, 4, seed=0), STEP)
        first = list(shapes)
        shapes.clear()
        method(_batch(method, 4, seed=20), STEP)
    assert first == shapes and len(first) == 8  # the keys of 2 branches x 4 stages, (B, D) each
    assert set(first) == {(4, 128)}


def test_hic_only_has_global_heads_and_queues_and_only_the_global_contrast():
    method = _method(cglc=False)
    losses = method(_batch(method, 2), STEP)
    assert set(losses) == {"loss", "loss_gg"} and set(method.contrast.queues) == {"global"}


def test_transfer_state_is_the_online_backbone_loadable_into_torchvision():
    backbone, extra = _method().transfer_state()
    result = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == [] and extra == {}


def test_a_cell_too_small_for_its_patch_is_refused_naming_the_sizes():
    with pytest.raises(ValueError, match=r"local_size 40 px .* patch_size 16 px"):
        _method(local_size=40, patch_size=16)


# -- through the engine -------------------------------------------------------------------------

RUN = {
    "method": "detco",
    "method_params": {**TINY, "queue_size": 16, "momentum": 0.99},
    "arch": "resnet18",
    "epochs": 2,
    "batch_size": 4,  # 12 images -> 3 steps per epoch
    "warmup_epochs": 1,
    "num_workers": 0,
    "seed": 3,
    "checkpoint_every_steps": 2,
    "log_every": 1,
    "device": "cpu",
}


@pytest.mark.slow  # 20-60 s on 2 shared cores: three short runs writing full checkpoints
def test_resume_after_a_stop_ends_bitwise_equal_to_the_uninterrupted_run(shards, tmp_path, capsys):
    # 1 epoch = 3 steps, stopped after 2
    straight, expected = stopped_and_resumed_run_equals_straight_run(PretrainSettings.from_dict({**RUN, "epochs": 1}), shards, tmp_path, capsys)
    assert int(expected["contrast.queues.local.c5.pointer"]) == 3 * 4
    final = torch.load(straight / "final.pt", weights_only=True)
    assert (final["method"], final["steps"]) == ("detco", 3)


@pytest.mark.slow  # ~80 s: a 1-process run and two 2-process spawns
def test_two_gloo_processes_agree_with_one_on_the_first_steps(shards, tmp_path):

    # SyncBN instead of shuffle-BN: BN statistics over the same global batch in both runs.
    run = {**RUN, "epochs": 1, "sync_bn": True, "method_params": {**RUN["method_params"], "shuffle_bn": False}}
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(PretrainSettings.from_dict(run), shards, one / "final.pt", one)
    spawn_two_ranks(run, shards, two)
    # Step 1 sees the same weights: equal up to float summation order. Step 2 follows one DDP
    # all-reduced update (another summation order): equal to a relative 1e-4.
    assert metric_values(two)[0] == pytest.approx(metric_values(one)[0], abs=1e-5)
    assert metric_values(two)[1] == pytest.approx(metric_values(one)[1], rel=1e-4)
    assert int(newest_model_state(two)["contrast.queues.global.c2.pointer"]) == 3 * 4  # every step the 4 gathered keys
    # Shuffle-BN across the two ranks, crops and 9-patch sets shuffled together: trains, queues agree.
    shuffled = tmp_path / "shuffled"
    spawn_two_ranks({**RUN, "epochs": 1}, shards, shuffled)
    assert all(math.isfinite(loss) for loss in metric_values(shuffled))
    assert int(newest_model_state(shuffled)["contrast.queues.local.c5.pointer"]) == 3 * 4


def _shapes_image(rng: np.random.Generator) -> Image.Image:
    """A 64 px image of 4 coloured squares on a coloured ground: crops of one image share parts
    that crops of another do not (unlike i.i.d. noise, where every image looks alike)."""
    image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        (x, y), side = rng.integers(0, 48, 2), int(rng.integers(12, 32))
        draw.rectangle([int(x), int(y), int(x) + side, int(y) + side], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def _loss_against_fixed_negatives(method: DetCo, batch: dict) -> float:
    """The loss of ``batch`` with every queue replaced by the same random unit vectors."""
    generator = torch.Generator().manual_seed(0)
    for queue in (q for stages in method.contrast.queues.values() for q in stages.values()):
        queue.features.copy_(F.normalize(torch.randn(queue.features.shape, generator=generator), dim=1))
    with torch.no_grad():
        return float(method(batch, STEP)["loss"])


@pytest.mark.slow  # ~60 s: 12 steps of 8 images, then a 2-iteration finetune
def test_a_short_run_lowers_the_loss_and_its_converted_weights_finetune(tmp_path):
    rng = np.random.default_rng(0)
    shard = write_image_shard(tmp_path / "shapes.tar", [_shapes_image(rng) for _ in range(48)])
    run = {**RUN, "epochs": 2, "batch_size": 8, "checkpoint_every_steps": 100, "optimizer": {"base_lr": 0.06, "reference_batch": 8}}
    pretrain(PretrainSettings.from_dict(run), [shard], tmp_path / "final.pt", tmp_path)
    # The logged loss is against queues that fill with ever better keys (at this scale it stays
    # near chance for many epochs, as MoCo v2's does); held-out views against one fixed bank of
    # negatives show what the encoders learned.
    held_out = [{"key": f"held{i}", "image": _shapes_image(np.random.default_rng(100 + i))} for i in range(16)]
    torch.manual_seed(RUN["seed"])  # the engine's initial weights: seeded, then built
    initial = DetCo(DetCoParams(**RUN["method_params"]), arch="resnet18")
    batch = initial.collate([initial.make_views(s, np.random.default_rng(i)) for i, s in enumerate(held_out)])
    trained = DetCo(DetCoParams(**RUN["method_params"]), arch="resnet18")
    trained.load_state_dict(newest_model_state(tmp_path))
    before, after = _loss_against_fixed_negatives(initial, batch), _loss_against_fixed_negatives(trained, batch)
    assert after < 0.7 * before, (before, after)
    assert all(math.isfinite(loss) for loss in metric_values(tmp_path))

    converted_weights_finetune(tmp_path / "final.pt", tmp_path, "detco")
