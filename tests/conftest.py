"""Fixtures shared by test modules in several folders (the workflow tests keep their own
helpers in tests/workflow/conftest.py)."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Set by .ci/run: CI has every resource the suite needs, so a missing one is a failure there.
STRICT_SKIPS = os.environ.get("REGIONCL_STRICT_SKIPS") == "1"

# Peak space a run takes under pytest's temp root (finetuned models, checkpoints, Snakemake
# runs), measured with pyproject.toml's tmp_path_retention_policy = "failed", which deletes each
# passed test's directory: at most 2.7 GB for the fast and the slow set (sampled every 30 s).
NEEDED_DISK_GIB = 4


def pytest_report_header(config: pytest.Config) -> str:
    """Free space where the tests write, in the header: a full disk fails tests far from their
    cause (a copy or a checkpoint save deep in a fixture), so the log should say it up front."""
    root = Path(config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir())
    while not root.exists():
        root = root.parent
    free_gib = shutil.disk_usage(root).free / 2**30
    line = f"free disk under {root}: {free_gib:.1f} GiB (a test run needs about {NEEDED_DISK_GIB} GiB)"
    if free_gib < NEEDED_DISK_GIB:
        line += "; too little: expect 'No space left on device' failures"
    return line


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a small shared CPU, torch's intra-op threads
    spin against other processes and make tiny training steps several times slower; one thread
    is also what each rank gets in CI. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def require_resource() -> Callable[[bool, str], None]:
    """``require_resource(available, reason)`` for what a developer's machine may lack but CI
    must have (a running SLURM cluster, ``../shared/specs``): skip with ``reason`` when it is not
    ``available``, and fail instead under ``REGIONCL_STRICT_SKIPS=1``, so CI cannot pass by
    skipping. Optional packages (detectron2) and GPUs keep plain skips."""

    def require(available: bool, reason: str) -> None:
        if available:
            return
        if STRICT_SKIPS:
            pytest.fail(f"{reason} (REGIONCL_STRICT_SKIPS=1: CI must not skip this)", pytrace=False)
        pytest.skip(reason)

    return require
