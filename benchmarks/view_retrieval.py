"""Has a pretrained backbone learned its pretext task? Top-1 retrieval of an image's second view.

    python benchmarks/view_retrieval.py --weights none results/weights/moco_v2_r18_16ep.tv.pth
        [--shards results/shards/embedded/*.tar] [--images 200] [--crop 64] [--threads 2]

For ``--images`` pretraining images it draws two views with MoCo v2's ``make_views`` (random
resized crops of scale 0.2-1 at ``--crop`` px and MoCo v2's photometric recipe: the invariances
every method here is trained for), pools each view's C5 features of the frozen backbone
(BatchNorm statistics re-estimated on the first views, the same for every checkpoint, as the
probe does) and reports the share of images whose second view is the nearest (cosine) of all
second views to its first view. Chance is 1 / ``--images``.

Instance discrimination is what MoCo v2 and BYOL train; a backbone that scores no better than a
random initialisation here has not learned its own task, whatever its loss says about the
projection head, so a bad probe (``regioncl probe``) then means too little pretraining rather
than the wrong invariances. All weights run in this process on the same views.
"""

from __future__ import annotations

import argparse
import glob
import itertools
from pathlib import Path

import torch
from torch.nn import functional as F

from regioncl.augment import view_output
from regioncl.data.shards import ShardStream
from regioncl.engine.loader import sample_rng
from regioncl.methods import get_method
from regioncl.probe import load_backbone, reestimate_batchnorm

VIEW_SEED = 12345  # not a training seed: these views are none the runs were trained on


def two_views(shards: list[str], images: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, crop, crop) first and second ImageNet-normalised views of the first N images."""
    moco = get_method("moco_v2")
    method = moco(moco.Params(crop_size=crop, queue_size=1), arch="resnet18")
    samples = ShardStream(shards, seed=VIEW_SEED, rank=0, world_size=1)
    samples.set_epoch(0, skip=0)
    first, second = [], []
    for sample in itertools.islice(samples, images):
        with view_output("normalized"):
            views = method.make_views(sample, sample_rng(VIEW_SEED, 0, sample["key"]))
        first.append(views["query"])
        second.append(views["key"])
    if len(first) < images:
        raise SystemExit(f"{shards}: {len(first)} images, fewer than --images {images}")
    return torch.stack(first), torch.stack(second)


@torch.no_grad()
def retrieval_accuracy(weights: Path | None, first: torch.Tensor, second: torch.Tensor) -> float:
    backbone, _ = load_backbone(weights, "resnet18", seed=0)
    reestimate_batchnorm(backbone, first.split(64))

    def embed(views: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([backbone.forward_stages(b)["c5"].mean(dim=(2, 3)) for b in views.split(64)]), dim=1)

    nearest = (embed(first) @ embed(second).T).argmax(dim=1)
    return float((nearest == torch.arange(len(first))).double().mean() * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="converted .tv.pth files (ResNet-18), or none")
    parser.add_argument("--shards", nargs="*", help="default: results/shards/embedded/*.tar")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--crop", type=int, default=64, help="view px (the CPU config's MoCo v2 crop)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shards = args.shards or sorted(glob.glob("results/shards/embedded/*.tar"))
    if not shards:
        raise SystemExit("no shards: pass --shards or run the pipeline's shards stage first")
    first, second = two_views(shards, args.images, args.crop)
    print(f"top-1 retrieval of the second view among {args.images} images (chance {100 / args.images:.1f} %)")
    for weights in args.weights:
        accuracy = retrieval_accuracy(None if weights == "none" else Path(weights), first, second)
        print(f"{weights}: {accuracy:.1f} %")


if __name__ == "__main__":
    main()
