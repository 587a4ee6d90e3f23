"""What a benchmark config costs on this machine: each run's pretraining speed, then the whole.

    python benchmarks/benchmark_cost.py [--configfile config/embedded_benchmark.yaml]
        [--epochs 2] [--threads 2] [--methods moco_v2 byol ...] [--finetune-minutes 3]

For each method of the config's runs it launches the real ``regioncl pretrain`` (the run's own
resolved settings, only ``epochs`` cut to ``--epochs``, on the config's shards, one process with
``--threads`` threads), reads images/s from the run's own metrics after its first epoch (warm-up
and start-up excluded), and projects every run of that method from it. The total assumes
Snakemake on as many cores as ``--threads``: pretraining runs one at a time, then the finetunes
(``--finetune-minutes`` each: the README's measured ~3 minutes on one thread) two side by side,
plus one probe per checkpoint. Proposals and shards are not counted (minutes; docs/proposals.md).
Run it on an idle machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from regioncl.config import WorkflowPlan, merged_config_files

PROBE_MINUTES = 0.6  # one `regioncl probe` on one thread (README)


def timed_run(settings: dict[str, Any], shards: list[str], epochs: int, threads: int) -> tuple[float, int]:
    """(mean images/s over the steps after the first epoch, images trained on per epoch) of a short
    real run (per epoch: whole batches, as the engine drops the last partial one)."""
    with tempfile.TemporaryDirectory(prefix="benchmark_cost.") as scratch:
        short = {**settings, "epochs": epochs, "checkpoint_every_steps": 10**6}
        command = [
            sys.executable, "-m", "regioncl.cli", "pretrain", "--settings", json.dumps(short), "--shards", *shards,
            "--nproc-per-node", "1", "--workdir", f"{scratch}/work", "--out", f"{scratch}/final.pt",
            "--metrics", f"{scratch}/metrics.jsonl",
        ]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in Path(f"{scratch}/metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = max(row["step"] for row in rows) // epochs
    timed = [row["images_per_s"] for row in rows if row["step"] > steps_per_epoch]
    if not timed:
        raise SystemExit(f"{settings['method']}: no step after the first epoch; pass --epochs 2 or more")
    return sum(timed) / len(timed), steps_per_epoch * settings["batch_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", nargs="*", type=Path, default=[Path("config/embedded_benchmark.yaml")])
    parser.add_argument("--epochs", type=int, default=2, help="of each timed run (the first is not counted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", help="only these (default: every method of the config's runs)")
    parser.add_argument("--finetune-minutes", type=float, default=3.0, help="one finetune + evaluation, one thread")
    args = parser.parse_args()

    config = merged_config_files(args.configfile)
    plan = WorkflowPlan(config, check_datasets=False)
    dataset = plan.pretrain_dataset
    shards = [str(path) for path in sorted(Path(f"results/shards/{dataset}").glob("*.tar"))]
    if not shards:
        raise SystemExit(f"no shards under results/shards/{dataset}/: run the pipeline's shards stage first")
    runs = [run for run in plan.runs.values() if not args.methods or run.method in args.methods]
    speed: dict[str, float] = {}
    images_per_epoch = 0
    for run in runs:
        if run.method not in speed:
            speed[run.method], images_per_epoch = timed_run(run.settings, shards, args.epochs, args.threads)
            print(f"{run.method}: {speed[run.method]:.1f} images/s", file=sys.stderr)

    total_pretrain = 0.0
    print("run | images/s | minutes")
    for run in runs:
        minutes = run.epochs * images_per_epoch / speed[run.method] / 60  # every run reads the same shards
        total_pretrain += minutes
        print(f"{run.name} | {speed[run.method]:.1f} | {minutes:.0f}")
    rows = len(runs) + len(plan.baselines)
    seeds = len(config["finetune"]["seeds"])
    finetunes = rows * seeds * args.finetune_minutes / 2
    probes = rows * PROBE_MINUTES / 2
    print(f"pretraining {total_pretrain:.0f} min; {rows * seeds} finetunes {finetunes:.0f} min (two at a time); "
          f"{rows} probes {probes:.0f} min; total {(total_pretrain + finetunes + probes) / 60:.1f} h")


if __name__ == "__main__":
    main()
