"""One entry point per transfer stage, dispatching on ``BenchmarkSettings.backend``.

The detectron2 backend is imported only when a benchmark asks for it, so the package (and
every torchvision benchmark) works without detectron2 installed.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from regioncl.transfer.benchmarks import BenchmarkSettings

# Which converted weights file each backend loads (rule convert writes both).
WEIGHTS_SUFFIX = {"torchvision": ".tv.pth", "detectron2": ".d2.pkl"}


def backend_module(benchmark: BenchmarkSettings) -> ModuleType:
    if benchmark.backend == "detectron2":
        try:
            from regioncl.transfer import detectron2_backend
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"benchmark {benchmark.name!r} has backend 'detectron2', which is not installed "
                f"({error}); install detectron2 from source (docs/transfer.md) or set backend: torchvision"
            ) from error
        return detectron2_backend
    from regioncl.transfer import torchvision_backend

    return torchvision_backend


def finetune(
    benchmark: BenchmarkSettings, weights: Path | None, seed: int, out: Path, workdir: Path, **launch: int | str
) -> None:
    """Finetune with the benchmark's backend. ``launch`` (detectron2 only): ``num_gpus``,
    ``num_machines``, ``machine_rank``, ``dist_url``, ``num_workers``."""
    if launch and benchmark.backend != "detectron2":
        raise ValueError(f"launch options {sorted(launch)}: only the detectron2 backend takes them")
    backend_module(benchmark).finetune(benchmark, weights, seed, out, workdir, **launch)


def evaluate(benchmark: BenchmarkSettings, model_path: Path, out: Path, *, run: str | None = None, method: str | None = None) -> dict:
    """Score the finetuned detector with the backend's evaluator; returns the written record."""
    if benchmark.backend == "detectron2":
        return backend_module(benchmark).evaluate(benchmark, model_path, out, run=run, method=method)
    from regioncl.transfer.evaluate import evaluate as evaluate_torchvision

    return evaluate_torchvision(benchmark, model_path, out, run=run, method=method)
