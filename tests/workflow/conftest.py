"""Helpers for running the real Snakefile in a scratch directory."""

import os
import re
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


@pytest.fixture
def roots_pointing_at_fixtures(tmp_path: Path) -> Path:
    """A config overlay pointing config/paper.yaml's dataset roots at the fixture tree."""
    overlay = tmp_path / "roots.yaml"
    overlay.write_text(
        "datasets:\n"
        f"  imagenet: {{layout: imagenet, root: {FIXTURE_DATASETS / 'imagenet'}}}\n"
        f"  coco: {{layout: coco, root: {FIXTURE_DATASETS / 'coco'}}}\n"
        f"  voc: {{layout: voc, root: {FIXTURE_DATASETS / 'voc'}}}\n"
        f"  cityscapes: {{layout: cityscapes, root: {FIXTURE_DATASETS / 'cityscapes'}}}\n"
        f"  lvis: {{layout: lvis, root: {FIXTURE_DATASETS / 'lvis'}}}\n"
    )
    return overlay
