"""Training images/s of every registered method at a fixed batch and crop, as ratios to MoCo v2.

    python benchmarks/pretrain_step.py [--arch resnet18] [--batch 16] [--crop 64] [--steps 5] [--device cpu]
                                       [--amp none|bf16|fp16] [--channels-last]

One forward + backward + SGD step + EMA update per timed step, on random views (the data path
is not measured); all methods run in this process so the ratios share the machine's load.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from regioncl.methods import StepInfo, available_methods, get_method

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def images_per_second(
    name: str, arch: str, batch: int, crop: int, steps: int, device: torch.device, amp: str = "none", channels_last: bool = False
) -> float:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    method = get_method(name)(get_method(name).Params(), arch=arch, crop_size=crop).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    # fp16 needs loss scaling as in the engine; bf16 and fp32 do not (the scaler is then a no-op).
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    view_names = ("query", "key") if name == "moco_v2" else ("view1", "view2")
    batch_views = {
        v: torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=memory_format) for v in view_names
    }
    info = StepInfo(step=0, epoch=0, steps_per_epoch=steps + 1, total_steps=steps + 1, seed=0)
    timings = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "none" else nullcontext()
        with autocast:
            loss = method(batch_views, info)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        method.update_momentum(info)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return batch / (sum(timings[1:]) / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    rates = {
        name: images_per_second(name, args.arch, args.batch, args.crop, args.steps, device, args.amp, args.channels_last)
        for name in available_methods()
    }
    layout = ", channels_last" if args.channels_last else ""
    print(f"{args.arch}, batch {args.batch}, crop {args.crop}, {device}, amp {args.amp}{layout}, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"{name:10s} {rate:8.1f} images/s  x{rate / rates['moco_v2']:.2f} vs moco_v2")


if __name__ == "__main__":
    main()
