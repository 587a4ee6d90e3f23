"""Finetuning torchvision detectors: data, schedule, determinism, exact resume, evaluation,
RetinaNet, and the device they run on."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from regioncl.data.layouts import DatasetSpec
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.coco_data import CocoDetection, hflip
from regioncl.transfer import torchvision_backend
from regioncl.transfer.identity import finetune_identity
from regioncl.transfer.registry import resolve_benchmark
from regioncl.transfer.torchvision_backend import (
    RESUME_MAY_CHANGE,
    batch_indices,
    build_detector,
    evaluate,
    finetune,
    load_pretrained_weights,
    lr_at,
    select_device,
)
from regioncl.weights import UnsafeWeightsError, read_detectron2_weights
from pretrain_runs import converted_resnet18_weights  # tests/pretrain_runs.py

CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}]


def draw_split(root: Path, split: str, sizes: list[tuple[int, int]], rng: np.random.Generator) -> None:
    """Noise images with 2-3 filled squares / discs each; COCO json with RLE masks."""
    images, annotations = [], []
    (root / split).mkdir(parents=True)
    for image_id, (width, height) in enumerate(sizes, start=1):
        pixels = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(2, 4))):
            category = CATEGORIES[int(rng.integers(0, 2))]["id"]
            side = int(rng.integers(16, 28))
            x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            mask = np.zeros((height, width), np.uint8)
            if category == 3:
                mask[y : y + side, x : x + side] = 1
            else:
                yy, xx = np.mgrid[:height, :width]
                mask[(yy - y - side / 2 + 0.5) ** 2 + (xx - x - side / 2 + 0.5) ** 2 <= (side / 2) ** 2] = 1
            pixels[mask > 0] = (220, 60, 60) if category == 3 else (60, 200, 220)
            rle = mask_util.encode(np.asfortranarray(mask))
            ys, xs = np.nonzero(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
        file_name = f"{image_id:03d}.png"
        Image.fromarray(pixels).save(root / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_coco")
    rng = np.random.default_rng(0)
    draw_split(root, "train", [(96, 80), (64, 96), (80, 80), (96, 96), (72, 64), (88, 72)], rng)
    draw_split(root, "val", [(96, 80), (80, 96), (64, 64)], rng)
    return root


@pytest.fixture(scope="module")
def pretrained_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights, _ = converted_resnet18_weights(tmp_path_factory.mktemp("weights"), seed=1)
    return weights


def tiny_benchmark(root: Path, **overrides) -> BenchmarkSettings:
    """A slim benchmark on the CPU, where runs are bit-reproducible (CUDA kernels such as RoIAlign's
    backward are not); the GPU tests override ``device``."""
    settings = {
        "name": "tiny",
        "dataset": {"root": str(root)},
        "device": "cpu",
        "model": "faster_rcnn",
        "arch": "resnet18",
        "norm": "bn",
        "heads": {"fpn_channels": 16, "box_head_dim": 32, "mask_head_channels": 8,
                  "rpn_batch_size_per_image": 32, "roi_batch_size_per_image": 16,
                  "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
                  "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50},
        "input": {"min_size": [80, 96], "max_size": 128},
        "solver": {"lr": 0.01, "iterations": 4, "batch_size": 2, "warmup_iters": 2,
                   "lr_steps": [3], "checkpoint_every": 2},
        "eval": {"score_threshold": 0.0},
    }
    settings.update(overrides)
    return BenchmarkSettings.from_dict(settings)


def with_iterations(benchmark: BenchmarkSettings, iterations: int) -> BenchmarkSettings:
    return dataclasses.replace(benchmark, solver=dataclasses.replace(benchmark.solver, iterations=iterations))


@pytest.fixture(scope="module")
def straight_run(tiny_coco: Path, pretrained_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    finetune(tiny_benchmark(tiny_coco), pretrained_weights, seed=5, out=out / "model.pt", workdir=out / "work")
    return out / "model.pt"


def test_benchmark_settings_reject_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match=r"BenchmarkSettings\.solver: unknown key\(s\) \['lrate'\]"):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "solver": {"lrate": 0.1}})
    with pytest.raises(ValueError, match=r"model: 'yolo' is not one of"):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "model": "yolo"})
    with pytest.raises(ValueError, match="needs norm 'frozen_bn'"):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "trainable_layers": 3})
    with pytest.raises(ValueError, match=r"device: 'gpu' is not one of \['auto', 'cpu', 'cuda'\]"):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "device": "gpu"})


def test_device_is_the_torchvision_backends_setting() -> None:
    with pytest.raises(ValueError, match=r"device: 'cuda' is the torchvision backend's.*num_gpus"):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "backend": "detectron2", "device": "cuda"})
    assert BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "backend": "detectron2"}).device == "auto"


def test_torchvision_builds_retinanet_but_names_what_it_cannot_honour() -> None:
    retinanet = {"name": "b", "dataset": {"root": "."}, "backend": "torchvision", "model": "retinanet", "arch": "resnet18"}
    assert BenchmarkSettings.from_dict(retinanet).iou_types == ("bbox",)
    with pytest.raises(ValueError, match=r"precise_bn: True needs backend 'detectron2'"):
        BenchmarkSettings.from_dict({**retinanet, "precise_bn": True})
    with pytest.raises(ValueError, match=r"sampler: 'repeat_factor' needs backend 'detectron2'"):
        BenchmarkSettings.from_dict({**retinanet, "sampler": "repeat_factor"})


def test_resolved_benchmark_round_trips_through_json() -> None:
    dataset = DatasetSpec(name="embedded", layout="embedded", root=Path("/data/embedded"))
    resolved = resolve_benchmark("b", {"model": "faster_rcnn", "arch": "resnet18"}, dataset)
    assert (resolved["arch"], resolved["dataset_name"]) == ("resnet18", "embedded")
    settings = BenchmarkSettings.from_dict(json.loads(json.dumps(resolved)))
    assert settings.dataset.path("val_json") == Path("/data/embedded/annotations/instances_val.json")
    assert settings.input.min_size == (640, 672, 704, 736, 768, 800)
    assert settings == BenchmarkSettings.from_dict(resolved)


@pytest.mark.parametrize(("norm", "trainable_layers"), [("syncbn", 5), ("frozen_bn", 3)])
def test_norm_choices_build_trainable_detectors(tiny_coco: Path, norm: str, trainable_layers: int) -> None:
    benchmark = tiny_benchmark(tiny_coco, norm=norm, trainable_layers=trainable_layers)
    model = build_detector(benchmark, num_classes=2).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected_frozen = trainable_layers < 5
    assert any(n.startswith("backbone.body.layer1.") for n in frozen) == expected_frozen
    assert not any(n.startswith("backbone.body.layer2.") for n in frozen)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == (norm == "syncbn")
    data = CocoDetection(tiny_coco / "annotations/instances_train.json", tiny_coco / "train", with_masks=False)
    (image_a, target_a), (image_b, target_b) = data[0], data[1]
    losses = model([image_a, image_b], [target_a, target_b])
    assert all(torch.isfinite(v) for v in losses.values())


def test_dataset_targets_follow_the_annotations(tiny_coco: Path) -> None:
    data = CocoDetection(tiny_coco / "annotations/instances_train.json", tiny_coco / "train", with_masks=True)
    image, target = data[0]
    assert image.shape == (3, 80, 96) and 0.0 <= image.min() and image.max() <= 1.0
    assert set(target["labels"].tolist()) <= {1, 2}  # category ids 3, 7 -> labels 1, 2
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hflip_mirrors_boxes_with_their_masks(tiny_coco: Path) -> None:
    data = CocoDetection(tiny_coco / "annotations/instances_train.json", tiny_coco / "train", with_masks=True)
    image, target = data[1]
    flipped_image, flipped = hflip(image, target)
    assert torch.equal(flipped_image.flip(-1), image)
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        xs = torch.nonzero(mask, as_tuple=True)[1]
        assert (box[0].item(), box[2].item()) == (xs.min().item(), xs.max().item() + 1)


def test_lr_warms_up_linearly_then_decays_at_the_steps() -> None:
    solver = tiny_benchmark(Path(".")).solver  # lr 0.01, warm-up 2 from 0.001, step at 3
    assert math.isclose(lr_at(solver, 0), 0.01 * 0.001)
    assert math.isclose(lr_at(solver, 1), 0.01 * (0.001 * 0.5 + 0.5))
    assert math.isclose(lr_at(solver, 2), 0.01)
    assert math.isclose(lr_at(solver, 3), 0.001)


def test_each_epoch_visits_every_image_once_in_a_seeded_order() -> None:
    order = [i for it in range(5) for i in batch_indices(seed=3, iteration=it, batch_size=2, size=5)]
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order[:5] != order[5:10] or order[:5] != list(range(5))
    assert batch_indices(3, 4, 2, 5) == batch_indices(3, 4, 2, 5)
    assert batch_indices(3, 0, 5, 5) != batch_indices(4, 0, 5, 5)


def test_finetune_writes_the_detector(straight_run: Path, pretrained_weights: Path) -> None:
    saved = torch.load(straight_run, weights_only=True)
    assert saved["format"] == "regioncl.detector/1"
    assert (saved["benchmark"], saved["seed"], saved["weights"]) == ("tiny", 5, str(pretrained_weights))
    assert saved["category_ids"] == [3, 7] and saved["method"] == "moco_v2"
    assert saved["state_dict"]["roi_heads.box_predictor.cls_score.weight"].shape == (3, 32)


@pytest.fixture
def counted_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The iterations the torchvision backend trains from now on (how much work a run did)."""
    iterations: list[int] = []
    train_step = torchvision_backend.train_step

    def counting(model, optimizer, images, targets, iteration):
        iterations.append(iteration)
        return train_step(model, optimizer, images, targets, iteration)

    monkeypatch.setattr(torchvision_backend, "train_step", counting)
    return iterations


def checkpoints_in(workdir: Path) -> dict[str, int]:
    """Identity directory -> iteration of its last checkpoint."""
    return {
        path.parent.name: torch.load(path, weights_only=True)["iteration"]
        for path in sorted(workdir.glob("*/checkpoint_last.pt"))
    }


def assert_resumed_run_equals(
    straight_run: Path, benchmark: BenchmarkSettings, weights: Path, tmp_path: Path, counted_steps: list[int], capsys
) -> None:
    """Stopping ``benchmark`` half-way and resuming it gives ``straight_run``'s exact weights,
    training only the iterations left, and says where it resumed."""
    workdir = tmp_path / "work"
    finetune(with_iterations(benchmark, 2), weights, 5, tmp_path / "half.pt", workdir)
    assert list(checkpoints_in(workdir).values()) == [2]
    capsys.readouterr()
    counted_steps.clear()
    finetune(benchmark, weights, 5, tmp_path / "model.pt", workdir)
    assert "finetune tiny seed 5: resuming from iteration 2" in capsys.readouterr().err
    assert counted_steps == [2, 3]
    resumed = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    straight = torch.load(straight_run, weights_only=True)["state_dict"]
    half = torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not torch.equal(half["backbone.body.conv1.weight"], straight["backbone.body.conv1.weight"])


def test_resumed_run_equals_the_uninterrupted_one(
    straight_run: Path, tiny_coco: Path, pretrained_weights: Path, tmp_path: Path, counted_steps, capsys
) -> None:
    assert_resumed_run_equals(straight_run, tiny_benchmark(tiny_coco), pretrained_weights, tmp_path, counted_steps, capsys)


def test_two_loader_workers_give_the_run_of_none(straight_run: Path, tiny_coco: Path, pretrained_weights: Path, tmp_path: Path) -> None:
    """Batches are a function of (seed, iteration), decoded wherever: the same weights, bitwise."""
    finetune(tiny_benchmark(tiny_coco), pretrained_weights, 5, tmp_path / "model.pt", tmp_path / "work", num_workers=2)
    with_workers = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    straight = torch.load(straight_run, weights_only=True)["state_dict"]
    assert with_workers.keys() == straight.keys()
    assert all(torch.equal(with_workers[k], straight[k]) for k in straight)


def test_identity_hashes_settings_seed_and_weights_bytes_not_the_iteration_count(
    tiny_coco: Path, pretrained_weights: Path, tmp_path: Path
) -> None:
    benchmark = tiny_benchmark(tiny_coco)
    key = finetune_identity(benchmark, 5, pretrained_weights, RESUME_MAY_CHANGE)["key"]
    slower = tiny_benchmark(tiny_coco, solver={**benchmark.solver.to_dict(), "lr": 0.02})
    assert finetune_identity(slower, 5, pretrained_weights, RESUME_MAY_CHANGE)["key"] != key
    assert finetune_identity(benchmark, 6, pretrained_weights, RESUME_MAY_CHANGE)["key"] != key
    assert finetune_identity(with_iterations(benchmark, 2), 5, pretrained_weights, RESUME_MAY_CHANGE)["key"] == key
    moved = tmp_path / "moved.tv.pth"
    moved.write_bytes(pretrained_weights.read_bytes())
    assert finetune_identity(benchmark, 5, moved, RESUME_MAY_CHANGE)["key"] == key
    moved.write_bytes(pretrained_weights.read_bytes() + b"\0")
    assert finetune_identity(benchmark, 5, moved, RESUME_MAY_CHANGE)["key"] != key


def test_a_changed_setting_reruns_from_scratch_and_writes_the_new_model(
    tiny_coco: Path, pretrained_weights: Path, tmp_path: Path, counted_steps, capsys
) -> None:
    """The issue's repro: change solver.lr, re-run in the same workdir; it must not resume."""
    workdir = tmp_path / "work"
    old = with_iterations(tiny_benchmark(tiny_coco), 1)  # one iteration is enough to tell models apart
    finetune(old, pretrained_weights, 5, tmp_path / "old.pt", workdir)
    changed = dataclasses.replace(old, solver=dataclasses.replace(old.solver, lr=0.02))
    counted_steps.clear()
    capsys.readouterr()
    finetune(changed, pretrained_weights, 5, tmp_path / "model.pt", workdir)
    assert "resuming" not in capsys.readouterr().err
    assert counted_steps == [0]
    assert sorted(checkpoints_in(workdir).values()) == [1, 1]  # beside the old run's, not over it
    finetune(changed, pretrained_weights, 5, tmp_path / "fresh.pt", tmp_path / "fresh")
    rerun, fresh, before = (
        torch.load(tmp_path / name, weights_only=True)["state_dict"] for name in ("model.pt", "fresh.pt", "old.pt")
    )
    assert all(torch.equal(rerun[k], fresh[k]) for k in fresh)
    assert not torch.equal(rerun["backbone.body.conv1.weight"], before["backbone.body.conv1.weight"])


def test_weights_replaced_under_the_same_path_are_not_resumed(
    tiny_coco: Path, pretrained_weights: Path, tmp_path: Path, counted_steps, capsys
) -> None:
    weights = tmp_path / "run.tv.pth"
    weights.write_bytes(pretrained_weights.read_bytes())
    short = with_iterations(tiny_benchmark(tiny_coco), 1)
    finetune(short, weights, 5, tmp_path / "first.pt", tmp_path / "work")
    replaced = torch.load(weights, weights_only=True)
    replaced["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in replaced["state_dict"].items()}
    torch.save(replaced, weights)
    counted_steps.clear()
    capsys.readouterr()
    finetune(short, weights, 5, tmp_path / "second.pt", tmp_path / "work")
    assert counted_steps == [0] and "resuming" not in capsys.readouterr().err


def test_a_truncated_annotation_json_fails_the_finetune_naming_the_file(tiny_coco: Path, tmp_path: Path) -> None:
    broken = tmp_path / "coco"
    broken.mkdir()
    (broken / "train").symlink_to(tiny_coco / "train")
    (broken / "annotations").mkdir()
    text = (tiny_coco / "annotations/instances_train.json").read_text()
    (broken / "annotations/instances_train.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{broken}/annotations/instances_train.json: invalid JSON at line 1"):
        finetune(tiny_benchmark(broken), None, 0, tmp_path / "m.pt", tmp_path / "work")


class Payload:
    """Unpickling this runs ``Path(target).touch()``: what a planted weights file could do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_detectron2_weights_are_read_without_running_code(pretrained_weights: Path, tmp_path: Path) -> None:
    converted = read_detectron2_weights(pretrained_weights.with_name("w.d2.pkl"))
    assert converted["method"] == "moco_v2" and converted["model"]["stem.conv1.weight"].shape == (64, 3, 7, 7)
    planted = tmp_path / "planted.d2.pkl"
    planted.write_bytes(pickle.dumps({"model": {}, "__author__": Payload(tmp_path / "PWNED")}))
    with pytest.raises(UnsafeWeightsError, match=r"planted\.d2\.pkl: refers to pathlib\..*\.touch; .* only numpy arrays"):
        read_detectron2_weights(planted)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("model", ["faster_rcnn", "retinanet"])
def test_weights_missing_a_backbone_key_are_refused_by_name(
    tiny_coco: Path, pretrained_weights: Path, tmp_path: Path, model: str
) -> None:
    weights = torch.load(pretrained_weights, weights_only=True)
    del weights["state_dict"]["backbone.body.layer4.1.conv2.weight"]
    torch.save(weights, tmp_path / "broken.tv.pth")
    benchmark = tiny_benchmark(tiny_coco, model=model)
    with pytest.raises(ValueError, match=r"missing backbone key backbone\.body\.layer4\.1\.conv2\.weight"):
        finetune(benchmark, tmp_path / "broken.tv.pth", 0, tmp_path / "m.pt", tmp_path / "w")


def assert_metrics_in_range(metrics: dict) -> None:
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v is None or 0.0 <= v <= 100.0 for v in metrics.values())
    assert all(metrics[k] is not None for k in ("AP", "AP50", "AP75"))


def test_a_step_hook_that_evaluates_sees_every_step_and_changes_no_weight(
    straight_run: Path, tiny_coco: Path, pretrained_weights: Path, tmp_path: Path
) -> None:
    """benchmarks/finetune_curve.py evaluates the detector from ``after_step``: the hook gets each
    step's count, the model and that step's losses, and the run it looks into trains exactly as
    without it (the model back in train mode, the detector's sampling still seeded per step)."""
    seen: list[tuple[int, float]] = []

    def evaluating_hook(done: int, model: torch.nn.Module, losses: dict[str, float]) -> None:
        model.eval()
        with torch.no_grad():
            model([torch.rand(3, 64, 64)])  # a prediction, as an evaluation makes
        seen.append((done, losses["loss"]))

    finetune(
        tiny_benchmark(tiny_coco), pretrained_weights, 5, tmp_path / "model.pt", tmp_path / "work",
        after_step=evaluating_hook,
    )
    assert [done for done, _ in seen] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) and loss > 0 for _, loss in seen)
    hooked = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    straight = torch.load(straight_run, weights_only=True)["state_dict"]
    assert all(torch.equal(hooked[k], straight[k]) for k in straight)


def test_evaluate_writes_box_metrics(straight_run: Path, tiny_coco: Path, tmp_path: Path) -> None:
    record = evaluate(tiny_benchmark(tiny_coco), straight_run, tmp_path / "metrics.json", run="r")
    assert json.loads((tmp_path / "metrics.json").read_text()) == record
    assert set(record["metrics"]) == {"bbox"}
    assert_metrics_in_range(record["metrics"]["bbox"])
    assert (record["benchmark"], record["run"], record["method"], record["seed"]) == ("tiny", "r", "moco_v2", 5)
    assert set(record["versions"]) == {"torch", "torchvision", "pycocotools", "regioncl"}


def test_mask_rcnn_from_random_init_finetunes_and_evaluates_masks(tiny_coco: Path, tmp_path: Path) -> None:
    benchmark = with_iterations(tiny_benchmark(tiny_coco, model="mask_rcnn"), 1)
    finetune(benchmark, None, 0, tmp_path / "model.pt", tmp_path / "work")
    record = evaluate(benchmark, tmp_path / "model.pt", tmp_path / "metrics.json")
    assert set(record["metrics"]) == {"bbox", "segm"}
    assert record["method"] == "random" and record["weights"] == "none"
    for metrics in record["metrics"].values():
        assert_metrics_in_range(metrics)


@pytest.fixture(scope="module")
def retinanet_run(tiny_coco: Path, pretrained_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("retinanet")
    benchmark = tiny_benchmark(tiny_coco, model="retinanet")
    finetune(benchmark, pretrained_weights, seed=5, out=out / "model.pt", workdir=out / "work")
    return out / "model.pt"


def test_retinanet_reads_p3_to_p7_from_c3_to_c5(tiny_coco: Path) -> None:
    model = build_detector(tiny_benchmark(tiny_coco, model="retinanet"), num_classes=2)
    features = model.backbone(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape) for f in features.values()] == [(1, 16, 128 // 2**level, 128 // 2**level) for level in range(3, 8)]
    assert model.backbone.fpn.extra_blocks.p6.in_channels == 512  # P6 from C5 of a ResNet-18
    assert model.head.classification_head.num_classes == 2  # no background class
    assert model.transform.min_size == (80, 96) and model.score_thresh == 0.0


def test_retinanet_loads_the_converted_backbone(tiny_coco: Path, pretrained_weights: Path) -> None:
    model = build_detector(tiny_benchmark(tiny_coco, model="retinanet"), num_classes=2)
    fields = load_pretrained_weights(model, pretrained_weights, "resnet18")
    provided = torch.load(pretrained_weights, weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert fields["method"] == "moco_v2" and provided
    assert all(torch.equal(loaded[k], v) for k, v in provided.items())


def test_retinanet_takes_and_gives_labels_1_to_k(tiny_coco: Path) -> None:
    torch.manual_seed(0)
    model = build_detector(tiny_benchmark(tiny_coco, model="retinanet"), num_classes=2).train()
    data = CocoDetection(tiny_coco / "annotations/instances_train.json", tiny_coco / "train", with_masks=False)
    samples = [data[i] for i in range(len(data))]
    assert 2 in torch.cat([t["labels"] for _, t in samples]).tolist()  # label K reaches the loss
    losses = model([image for image, _ in samples[:2]], [target for _, target in samples[:2]])
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        outputs = model.eval()([image for image, _ in samples[:2]])
    labels = torch.cat([o["labels"] for o in outputs])
    assert len(labels) > 0 and labels.min() >= 1 and labels.max() <= 2


def test_resumed_retinanet_run_equals_the_uninterrupted_one(
    retinanet_run: Path, tiny_coco: Path, pretrained_weights: Path, tmp_path: Path, counted_steps, capsys
) -> None:
    benchmark = tiny_benchmark(tiny_coco, model="retinanet")
    assert_resumed_run_equals(retinanet_run, benchmark, pretrained_weights, tmp_path, counted_steps, capsys)


def test_retinanet_writes_and_evaluates_box_metrics(retinanet_run: Path, tiny_coco: Path, tmp_path: Path) -> None:
    saved = torch.load(retinanet_run, weights_only=True)
    assert (saved["format"], saved["method"], saved["category_ids"]) == ("regioncl.detector/1", "moco_v2", [3, 7])
    assert saved["state_dict"]["head.classification_head.cls_logits.weight"].shape[0] == 9 * 2  # anchors x K
    record = evaluate(tiny_benchmark(tiny_coco, model="retinanet"), retinanet_run, tmp_path / "metrics.json")
    assert set(record["metrics"]) == {"bbox"}
    assert_metrics_in_range(record["metrics"]["bbox"])


def test_device_auto_is_the_gpu_when_torch_sees_one(tiny_coco: Path) -> None:
    assert select_device(tiny_benchmark(tiny_coco)) == torch.device("cpu")
    auto = select_device(tiny_benchmark(tiny_coco, device="auto"))
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available")
def test_cuda_without_a_gpu_is_refused_clearly(straight_run: Path, tiny_coco: Path, tmp_path: Path) -> None:
    benchmark = tiny_benchmark(tiny_coco, device="cuda")
    refusal = r"benchmark 'tiny': device: 'cuda' but torch sees no CUDA GPU.*'auto' or 'cpu'"
    with pytest.raises(ValueError, match=refusal):
        finetune(benchmark, None, 0, tmp_path / "m.pt", tmp_path / "work")
    with pytest.raises(ValueError, match=refusal):
        evaluate(benchmark, straight_run, tmp_path / "metrics.json")
    assert not (tmp_path / "work").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_finetune_resume_and_evaluate_run_on_the_gpu(
    tiny_coco: Path, pretrained_weights: Path, tmp_path: Path, model: str
) -> None:
    benchmark = tiny_benchmark(tiny_coco, model=model, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    finetune(with_iterations(benchmark, 2), pretrained_weights, 0, tmp_path / "half.pt", tmp_path / "work")
    finetune(benchmark, pretrained_weights, 0, tmp_path / "model.pt", tmp_path / "work")  # resumes at 2
    assert torch.cuda.max_memory_allocated() > 0
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {t.device.type for t in saved["state_dict"].values()} == {"cpu"}
    half = torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"]
    assert not torch.equal(half["backbone.body.conv1.weight"], saved["state_dict"]["backbone.body.conv1.weight"])
    record = evaluate(benchmark, tmp_path / "model.pt", tmp_path / "metrics.json")
    assert set(record["metrics"]) == set(benchmark.iou_types)
    for metrics in record["metrics"].values():
        assert_metrics_in_range(metrics)


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
def test_detectron2_benchmark_without_detectron2_says_how_to_fix_it(tmp_path):
    from regioncl.transfer import backends

    bench = BenchmarkSettings.from_dict({"name": "d2", "dataset": {"root": str(tmp_path)}, "backend": "detectron2"})
    with pytest.raises(ModuleNotFoundError, match=r"backend 'detectron2', which is not installed.*backend: torchvision"):
        backends.finetune(bench, None, 0, tmp_path / "m.pt", tmp_path / "work")


def test_launch_options_are_refused_for_torchvision(tmp_path):
    from regioncl.transfer import backends

    bench = BenchmarkSettings.from_dict({"name": "tv", "dataset": {"root": str(tmp_path)}, "arch": "resnet18"})
    with pytest.raises(ValueError, match=r"launch options \['num_gpus'\].*torchvision backend, which takes only \['num_workers'\]"):
        backends.finetune(bench, None, 0, tmp_path / "m.pt", tmp_path / "work", num_gpus=2)
