"""Helpers for running the real Snakefile in a scratch directory."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = Path(__file__).with_name("tiny.yaml")
FIXTURE_DATASETS = ROOT / "tests" / "fixtures" / "datasets"


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `snakemake` on the project's Snakefile with outputs under ``workdir``."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Rules call the `regioncl` console script: make the one beside this Python visible.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table."""
    table = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE) if m.group(1) != "total"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole pipeline on tiny.yaml, run once per session and shared: tests only read it (a
    test that deletes or re-runs outputs takes ``tiny_run_copy``)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY_CONFIG))
    return workdir


@pytest.fixture
def tiny_run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``tiny_run``, .snakemake metadata and mtimes included, so Snakemake
    sees the same finished state."""
    return Path(shutil.copytree(tiny_run, tmp_path / "tiny_run", symlinks=True))


@pytest.fixture
def roots_pointing_at_fixtures(tmp_path: Path) -> Path:
    return write_roots_overlay(tmp_path)


def write_roots_overlay(directory: Path) -> Path:
    """A config overlay pointing config/paper.yaml's dataset roots at the fixture tree."""
    overlay = directory / "roots.yaml"
    overlay.write_text(
        "datasets:\n"
        f"  imagenet: {{layout: imagenet, root: {FIXTURE_DATASETS / 'imagenet'}}}\n"
        f"  coco: {{layout: coco, root: {FIXTURE_DATASETS / 'coco'}}}\n"
        f"  voc: {{layout: voc, root: {FIXTURE_DATASETS / 'voc'}}}\n"
        f"  cityscapes: {{layout: cityscapes, root: {FIXTURE_DATASETS / 'cityscapes'}}}\n"
        f"  lvis: {{layout: lvis, root: {FIXTURE_DATASETS / 'lvis'}}}\n"
    )
    return overlay


@pytest.fixture
def backends_unchecked(tmp_path: Path) -> Path:
    return write_backends_unchecked_overlay(tmp_path)


def write_backends_unchecked_overlay(directory: Path) -> Path:
    """A config overlay planning detectron2 benchmarks on a machine without detectron2 (as on a
    login node): `finetune.check_backends: false`."""
    overlay = directory / "backends_unchecked.yaml"
    overlay.write_text("finetune:\n  check_backends: false\n")
    return overlay
