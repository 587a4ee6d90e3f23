"""Training images/s of every registered method at a fixed batch and crop, as ratios to MoCo v2.

    python benchmarks/pretrain_step.py [--arch resnet18] [--batch 16] [--crop 64] [--steps 5] [--device cpu]
                                       [--amp none|bf16|fp16] [--channels-last] [--methods moco_v2 byol ...]

Each method runs at its paper defaults with every view size (its ``pixel_params``) scaled by
crop / 224, so ``--crop`` is the size of a method's 224-px views (SoCo's 112-px V3 becomes
crop / 2). Its batch is built once, as in training, by its own ``make_views`` and ``collate`` on
synthetic images (noise, ~1.75 x 1.3 crop px) carrying random proposal boxes, so region methods
get their boxes; then one forward + backward + SGD step + EMA update per timed step (the data
path is not timed). All methods run in this process so the ratios share the machine's load.
Peak memory is the CUDA allocator's peak over a method's steps (GPU only).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_map

from regioncl.engine.loader import sample_rng
from regioncl.methods import PretrainMethod, StepInfo, available_methods, get_method

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PAPER_VIEW = 224  # the view size the methods' default pixel_params are given for
PROPOSALS_PER_IMAGE = 8


def synthetic_samples(count: int, crop: int, seed: int = 0) -> list[dict[str, Any]]:
    """ShardStream-like samples: {"key", "image" (PIL RGB), "boxes" (K, 4) float32 image px, "width", "height"}.

    Boxes follow SoCo's proposal filter: sqrt(wh) 0.3-0.8 of the image's, aspect ratio 1/3-3.
    """
    rng = np.random.default_rng(seed)
    width, height = round(crop * 1.75), round(crop * 1.3)
    samples = []
    for index in range(count):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        side = rng.uniform(0.3, 0.8, PROPOSALS_PER_IMAGE) * np.sqrt(width * height)
        aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), PROPOSALS_PER_IMAGE))
        box_w, box_h = np.minimum(side * np.sqrt(aspect), width), np.minimum(side / np.sqrt(aspect), height)
        x1, y1 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
        boxes = np.stack([x1, y1, x1 + box_w, y1 + box_h], axis=1).astype(np.float32)  # (K, 4)
        image = Image.fromarray(pixels)
        samples.append({"key": f"synthetic{index:05d}", "image": image, "boxes": boxes, "width": width, "height": height})
    return samples


def build_batch(
    method: PretrainMethod, samples: list[dict[str, Any]], device: torch.device, memory_format: torch.memory_format
) -> Any:
    """The method's views of ``samples``, collated, on ``device`` ((B, C, H, W) images in ``memory_format``)."""
    batch = method.collate([method.make_views(sample, sample_rng(0, 0, sample["key"])) for sample in samples])

    def to_device(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() == 4 and value.is_floating_point():
            return value.to(device, memory_format=memory_format)
        return value.to(device)

    return tree_map(to_device, batch)


def measure(
    name: str, arch: str, batch: int, crop: int, steps: int, device: torch.device, amp: str = "none", channels_last: bool = False
) -> tuple[float, float | None]:
    """(images per second, peak CUDA memory in GiB or None on the CPU) of method ``name``."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    method_cls = get_method(name)
    params = method_cls.scaled_params(method_cls.Params(), crop / PAPER_VIEW)
    method = method_cls(params, arch=arch).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    # fp16 needs loss scaling as in the engine; bf16 and fp32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    views = build_batch(method, synthetic_samples(batch, crop), device, memory_format)
    info = StepInfo(step=0, epoch=0, steps_per_epoch=steps + 1, total_steps=steps + 1, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "none" else nullcontext()
        with autocast:
            loss = method(views, info)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        method.update_momentum(info)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return batch / (sum(timings[1:]) / steps), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--methods", nargs="+", choices=available_methods(), help="default: every registered method")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {
        name: measure(name, args.arch, args.batch, args.crop, args.steps, device, args.amp, args.channels_last)
        for name in dict.fromkeys(["moco_v2", *(args.methods or available_methods())])  # moco_v2: the reference
    }
    layout = ", channels_last" if args.channels_last else ""
    threads = torch.get_num_threads()
    print(f"{args.arch}, batch {args.batch}, crop {args.crop}, {device}, amp {args.amp}{layout}, {threads} threads")
    reference = results["moco_v2"][0]
    for name, (rate, peak) in results.items():
        memory = f"  peak {peak:6.2f} GiB" if peak is not None else ""
        print(f"{name:10s} {rate:8.1f} images/s  x{rate / reference:.2f} vs moco_v2{memory}")


if __name__ == "__main__":
    main()
