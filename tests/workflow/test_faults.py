"""Faults on a local run: a killed pretraining job resumes; bad inputs are skipped or named.

After every fault, outputs that had finished are neither lost nor recomputed (their bytes and
mtimes are compared before and after). Config errors already covered by test_dag.py (schema
errors, missing roots, malformed annotations) are re-checked here only for that property.
"""

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY_CONFIG, snakemake

pytestmark = pytest.mark.slow

RUN = "moco_v2_r18_8ep"  # 24 images / batch 8 x 8 epochs = 24 steps: time to kill midway
SHORT_RUN = "short"
LONG_RUNS = """
pretrain:
  runs:
    - method: moco_v2
      epochs: 8
    - {name: short, method: moco_v2, epochs: 1}
"""


def _snapshot(paths: list[Path]) -> dict[Path, tuple[int, bytes]]:
    return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in paths}


def _pretrain_pids(workdir: Path, run: str) -> list[int]:
    """Processes running `regioncl.cli pretrain` for ``run`` in ``workdir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:  # the process ended, or is not ours to read
            continue
        if b"regioncl.cli" in cmdline and b"pretrain" in cmdline and Path(cwd) == workdir:
            if any(run.encode() in arg for arg in cmdline):
                pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """A local run whose pretraining job is SIGKILLed after its first checkpoint, then re-run."""
    workdir = tmp_path_factory.mktemp("faults")
    overlay = workdir / "long.yaml"
    overlay.write_text(LONG_RUNS)
    configs = ["--configfile", str(TINY_CONFIG), str(overlay)]
    target = f"results/pretrain/{RUN}/checkpoint_final.pt"

    first: dict[str, subprocess.CompletedProcess] = {}
    thread = threading.Thread(
        target=lambda: first.setdefault("run", snakemake(workdir, "--cores", "2", target, *configs, check=False))
    )
    thread.start()
    deadline = time.monotonic() + 300
    # A checkpoint whose .sha256 exists is a finished save (the reader skips unfinished ones).
    while not list((workdir / f"results/work/pretrain/{RUN}").glob("*/checkpoint_*.pt.sha256")):
        assert thread.is_alive() and time.monotonic() < deadline, "pretraining wrote no checkpoint"
        time.sleep(0.2)
    finished = _snapshot(sorted((workdir / "results").glob("shards/embedded/*.tar")) + [workdir / "results/lists/embedded.tsv"])
    pids = _pretrain_pids(workdir, RUN)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    second = snakemake(workdir, "--cores", "2", target, *configs)
    return {"workdir": workdir, "configs": configs, "killed": pids, "first": first["run"], "second": second, "finished": finished}


def test_killed_pretraining_fails_the_workflow(killed_then_resumed):
    assert killed_then_resumed["killed"], "no pretraining process found to kill"
    assert killed_then_resumed["first"].returncode != 0


def test_rerun_resumes_from_the_last_checkpoint_not_step_0(killed_then_resumed):
    workdir = killed_then_resumed["workdir"]
    log = (workdir / f"results/logs/pretrain/{RUN}.log").read_text()
    resumed = re.search(r"resuming from step (\d+)", log)
    assert resumed and int(resumed.group(1)) > 0, log[-2000:]
    assert (workdir / f"results/pretrain/{RUN}/checkpoint_final.pt").is_file()


def test_kill_lost_and_recomputed_nothing_that_had_finished(killed_then_resumed):
    finished = killed_then_resumed["finished"]
    assert _snapshot(list(finished)) == finished
    output = killed_then_resumed["second"].stdout + killed_then_resumed["second"].stderr
    assert re.search(r"^(rule|localrule) (shards|proposals|image_list):", output, re.MULTILINE) is None


def test_truncated_shard_is_named_with_how_to_rebuild_it_and_nothing_finished_is_lost(killed_then_resumed):
    workdir, configs = killed_then_resumed["workdir"], killed_then_resumed["configs"]
    final = workdir / f"results/pretrain/{RUN}/checkpoint_final.pt"
    kept = _snapshot([final, workdir / "results/shards/embedded/00000.tar"])
    shard = workdir / "results/shards/embedded/00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])

    # Only the run that has not finished yet is asked for; the finished one stays as it is.
    result = snakemake(workdir, "--cores", "2", f"results/pretrain/{SHORT_RUN}/checkpoint_final.pt", *configs, check=False)
    output = result.stdout + result.stderr + (workdir / f"results/logs/pretrain/{SHORT_RUN}.log").read_text()
    assert result.returncode != 0
    assert "shard results/shards/embedded/00001.tar is truncated or corrupt" in output
    assert "delete it and re-run the workflow to rebuild it" in output
    assert _snapshot(list(kept)) == kept


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ("pretrain_data: {dataset: embedded, chunks: 0}", "chunks"),
        ("datasets: {mine: {layout: folder, root: /nonexistent/images}}\npretrain_data: {dataset: mine, chunks: 1}",
         "/nonexistent/images"),
    ],
    ids=["invalid_value", "missing_root"],
)  # fmt: skip
def test_config_errors_touch_no_finished_output(killed_then_resumed, overlay, message):
    workdir, configs = killed_then_resumed["workdir"], killed_then_resumed["configs"]
    results = sorted(path for path in (workdir / "results").rglob("*") if path.is_file())
    before = {path: path.stat().st_mtime_ns for path in results}
    bad = workdir / "bad.yaml"
    bad.write_text(overlay + "\n")

    result = snakemake(workdir, "--cores", "2", *configs, str(bad), check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert {path: path.stat().st_mtime_ns for path in results} == before
    assert sorted(path for path in (workdir / "results").rglob("*") if path.is_file()) == results


def _write_images(folder: Path, count: int) -> None:
    """Small photos-like images: a noisy gradient with a few solid boxes (selective search finds them)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for index in range(count):
        image = np.linspace(0, 180, 128, dtype=np.float32)[None, :, None] + rng.normal(0, 8, (96, 128, 3))
        for _ in range(3):
            x, y = rng.integers(0, 80), rng.integers(0, 50)
            image[y : y + 40, x : x + 44] = rng.integers(0, 255, 3)
        cv2.imwrite(str(folder / f"img{index}.png"), np.clip(image, 0, 255).astype(np.uint8))


def test_corrupt_image_in_a_folder_is_skipped_and_reported_and_the_rest_processed(tmp_path):
    root = tmp_path / "images"
    _write_images(root / "good", 8)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    overlay = tmp_path / "folder.yaml"
    overlay.write_text(f"datasets: {{mine: {{layout: folder, root: {root}}}}}\npretrain_data: {{dataset: mine, chunks: 1}}\n")
    workdir = tmp_path / "run"
    configs = ["--configfile", str(TINY_CONFIG), str(overlay)]
    shard = "results/shards/mine/00000.tar"

    snakemake(workdir, "--cores", "2", shard, *configs)
    report = json.loads((workdir / "results/proposals/mine/00000.report.json").read_text())
    assert (report["images"], report["good"], report["bad"]) == (9, 8, 1)
    assert [entry["key"] for entry in report["bad_files"]] == ["broken"]
    assert report["bad_files"][0]["reason"]
    with subprocess.Popen(["tar", "-tf", str(workdir / shard)], stdout=subprocess.PIPE, text=True) as tar:
        members = tar.stdout.read().split()
    assert sorted({name.split(".")[0] for name in members}) == [f"good__img{i}" for i in range(8)]

    finished = _snapshot(sorted((workdir / "results").glob("*/mine/*")))
    result = snakemake(workdir, "--cores", "2", shard, *configs)
    assert "Nothing to be done" in result.stdout + result.stderr
    assert _snapshot(list(finished)) == finished
