"""How fast a detector learns from each initialisation: box AP at several points of one finetune.

    python benchmarks/finetune_curve.py --weights none results/weights/moco_v2_r18_64ep.tv.pth
        [--configfile config/embedded_benchmark.yaml] [--benchmark embedded_frcnn_r18fpn]
        [--iterations 640] [--eval-every 80] [--seeds 0 1 2] [--threads 1] [--out curve.csv]

The question it answers is issue 13's: does a pretrained backbone give the detector a head start
over random initialisation, and for how long? One finetune per (weights, seed) runs the
benchmark's own torchvision-backend finetune (``torchvision_backend.finetune``, evaluated from its
per-step hook: the same batches, flips and detector sampling as ``regioncl finetune``), with the solver stretched to
``--iterations`` (its warm-up kept, each lr step at the same fraction of the schedule), and
evaluates the detector on the val split every ``--eval-every`` iterations with the benchmark's
evaluator. So the AP at iteration k is that of a k-iteration prefix of one long schedule, not of
a k-iteration schedule with its own decay: it measures learning speed, and the last row is the
finetune the benchmark itself would give at ``--iterations``.

Every run is in this process, one after another, so the rows share the machine; the table gives
each weights file's AP and its difference to the first ``--weights`` (the baseline: pass ``none``,
random initialisation, first). Config files merge as Snakemake merges ``--configfile``s.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from regioncl.config import WorkflowPlan, merged_config_files
from regioncl.transfer import torchvision_backend as backend
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.coco_data import CocoDetection
from regioncl.transfer.torchvision_eval import coco_metrics, predict


def benchmark_settings(configfiles: list[Path], name: str, iterations: int) -> BenchmarkSettings:
    """The resolved benchmark ``name`` of the merged config, its solver stretched to ``iterations``."""
    settings = WorkflowPlan(merged_config_files(configfiles), check_datasets=False).benchmark(name)
    solver = settings["solver"]
    stretch = iterations / solver["iterations"]
    solver = {
        **solver,
        "iterations": iterations,
        "lr_steps": [round(step * stretch) for step in solver["lr_steps"]],
        "checkpoint_every": iterations,
    }
    benchmark = BenchmarkSettings.from_dict({**settings, "solver": solver})
    if benchmark.backend != "torchvision" or benchmark.task != "detection":
        raise SystemExit(f"{name}: this benchmark follows torchvision-backend detectors only")
    return benchmark


def curve(benchmark: BenchmarkSettings, weights: Path | None, seed: int, eval_every: int) -> list[dict[str, Any]]:
    """Box AP, AP50 on the val split after every ``eval_every`` iterations of one finetune: the
    benchmark's own ``finetune`` (same data, subset, batches, sampling), evaluated from its
    per-step hook; its checkpoint and model go to a scratch folder."""
    val_json = benchmark.dataset.path("val_json")
    val = CocoDetection(val_json, benchmark.dataset.path("val_images"), with_masks=False)
    device = backend.select_device(benchmark)
    points, start = [], time.perf_counter()

    def evaluate(done: int, model: torch.nn.Module, losses: dict[str, float]) -> None:
        if done % eval_every and done != benchmark.solver.iterations:
            return
        model.eval()
        metrics = coco_metrics(val_json, predict(model, val, benchmark.eval.batch_size, device), "bbox")
        points.append(
            {"iteration": done, "AP": metrics["AP"], "AP50": metrics["AP50"], "loss": losses["loss"],
             "seconds": round(time.perf_counter() - start)}
        )
        print(f"  {weights or 'none'} seed {seed} it {done}: AP {metrics['AP']:.2f} AP50 {metrics['AP50']:.2f}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="finetune_curve.") as scratch:
        backend.finetune(
            benchmark, weights, seed, Path(scratch) / "model.pth", Path(scratch) / "work", after_step=evaluate
        )
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="converted .tv.pth files, or none (first: the baseline)")
    parser.add_argument("--configfile", nargs="*", type=Path, default=[], help="overlays on config/config.yaml")
    parser.add_argument("--benchmark", default="embedded_frcnn_r18fpn")
    parser.add_argument("--iterations", type=int, default=640)
    parser.add_argument("--eval-every", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="CSV of every point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    benchmark = benchmark_settings(args.configfile, args.benchmark, args.iterations)
    rows = []
    for weights in args.weights:
        for seed in args.seeds:
            for point in curve(benchmark, None if weights == "none" else Path(weights), seed, args.eval_every):
                rows.append({"weights": weights, "seed": seed, **point})
    if args.out:
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    # AP per iteration, mean over seeds, and its difference to the baseline (the first weights).
    def mean_ap(weights: str, iteration: int) -> float:
        values = [r["AP"] for r in rows if r["weights"] == weights and r["iteration"] == iteration]
        return sum(values) / len(values)

    iterations = sorted({r["iteration"] for r in rows})
    print(f"box AP on {args.benchmark}'s val split, mean of seeds {args.seeds}; in brackets: minus {args.weights[0]}")
    print("iteration | " + " | ".join(args.weights))
    for iteration in iterations:
        baseline = mean_ap(args.weights[0], iteration)
        cells = [f"{mean_ap(w, iteration):.2f}" + (f" ({mean_ap(w, iteration) - baseline:+.2f})" if i else "")
                 for i, w in enumerate(args.weights)]
        print(f"{iteration} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
