"""One entry point per transfer stage, dispatching on ``BenchmarkSettings.backend``.

The detectron2 backend is imported only when a benchmark asks for it, so the package (and
every torchvision benchmark) works without detectron2 installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from regioncl.transfer.benchmarks import BACKENDS, BenchmarkSettings

WEIGHTS_SUFFIX = {name: backend.weights_suffix for name, backend in BACKENDS.items()}


def backend_installed(backend: str) -> bool:
    """Whether ``backend``'s package is importable here (torchvision's always is)."""
    package = BACKENDS[backend].package
    return package is None or importlib.util.find_spec(package) is not None


def missing_backends(benchmark_backends: Mapping[str, str]) -> list[str]:
    """One sentence per backend not installed here: the benchmarks (name -> backend) needing it
    and its install command. Empty when every benchmark can run."""
    needed: dict[str, list[str]] = {}
    for name, backend in benchmark_backends.items():
        if not backend_installed(backend):
            needed.setdefault(backend, []).append(name)
    return [
        f"backend {backend!r} is not installed, and benchmarks {names} need it; install it with: "
        f"{BACKENDS[backend].install}"
        for backend, names in needed.items()
    ]


def backend_module(benchmark: BenchmarkSettings, launch: Mapping[str, object]) -> ModuleType:
    """The benchmark's backend module for its task (detection, or semantic segmentation:
    ``regioncl.transfer.semseg``), imported now (detectron2 only when asked for), after checking
    that it takes the ``launch`` options given."""
    backend = BACKENDS[benchmark.backend]
    unknown = sorted(set(launch) - set(backend.launch_options))
    if unknown:
        raise ValueError(
            f"launch options {unknown}: benchmark {benchmark.name!r} runs on the {benchmark.backend} "
            f"backend, which takes only {list(backend.launch_options)} (its device comes from the "
            "benchmark's device setting)"
        )
    try:
        return importlib.import_module(backend.modules[benchmark.task])
    except ModuleNotFoundError as error:
        if backend.package is None or error.name != backend.package:
            raise
        raise ModuleNotFoundError(
            f"benchmark {benchmark.name!r} has backend {benchmark.backend!r}, which is not installed "
            f"({error}); install it with: {backend.install}; or set backend: torchvision"
        ) from error


def finetune(
    benchmark: BenchmarkSettings,
    weights: Path | None,
    seed: int,
    out: Path,
    workdir: Path,
    *,
    metrics: Path | None = None,
    **launch: int | str,
) -> None:
    """Finetune with the benchmark's backend; ``metrics``: where to write the per-iteration
    losses and lr (``regioncl.curves``). ``launch`` (detectron2 only): ``num_gpus``,
    ``num_machines``, ``machine_rank``, ``dist_url``, ``num_workers``."""
    backend_module(benchmark, launch).finetune(benchmark, weights, seed, out, workdir, metrics=metrics, **launch)


def evaluate(
    benchmark: BenchmarkSettings,
    model_path: Path,
    out: Path,
    *,
    run: str | None = None,
    method: str | None = None,
    **launch: int | str,
) -> dict:
    """Score the finetuned model with the backend's evaluator; returns the written record.
    ``launch`` (detectron2 only): ``num_gpus`` > 0 evaluates on the GPU (default: the CPU)."""
    return backend_module(benchmark, launch).evaluate(benchmark, model_path, out, run=run, method=method, **launch)
