"""The tiny pipeline on a real SLURM cluster through the slurm profile, with a cancelled job.

Needs a running cluster: `workflow/scripts/local-slurm start` (CI's .ci/run starts one). The
pretraining job runs as 2 SLURM tasks (gloo on CPU, one thread each) started by `srun`; it is
cancelled with `scancel` after its first checkpoint, and the re-run resumes from there.
"""

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY_CONFIG, snakemake

from regioncl.launch import standalone_command

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # minutes: a dozen SLURM jobs

RUN = "moco_v2_r18_8ep"  # 24 images / batch 8 x 8 epochs = 24 steps: time to cancel midway
BENCHMARK = "embedded_frcnn_r18fpn"
TWO_TASKS = """
pretrain:
  nproc_per_node: 2
  threads: 1
  launch: {mode: per_task}
  runs:
    - method: moco_v2
      epochs: 8
resources:
  pretrain: {cpus: 1}   # per task: 2 tasks on the 2-CPU test node
"""
# Settings for this test cluster only (a real cluster keeps the profile's): no accounts, no
# slurmdbd (squeue for status), quick first status check, no retry (the cancel must stick),
# and the small stages grouped into two jobs to keep the job count (and test time) down.
# `--cores 2` is the test node's size: Snakemake sizes a group job as the widest set of its jobs
# that may run at once, capped by --cores; uncapped, the "post" group (2 finetunes + 2 probes)
# asked for 3 CPUs and stayed pending for ever on this 2-CPU node.
TEST_CLUSTER_ARGS = [
    "--profile", str(ROOT / "workflow/profiles/slurm"),
    "--cores", "2",
    "--slurm-no-account",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--retries", "0",
    "--latency-wait", "5",
    "--groups", *(f"{rule}=prep" for rule in ("embedded_dataset", "image_list", "proposals", "shards")),
    *(f"{rule}=post" for rule in ("convert", "finetune", "evaluate", "probe", "tables")),
]  # fmt: skip


def _cluster_state() -> str:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if not any(state.startswith(("idle", "mix", "alloc", "completing")) for state in states):
        return f"no SLURM node accepts jobs (sinfo: {states}); start one with workflow/scripts/local-slurm start"
    return "up"


def _wait_for(find, what: str, timeout: float, process: threading.Thread) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found[0]
        if not process.is_alive():
            raise AssertionError(f"snakemake ended before {what}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout} s")


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in paths}


@pytest.fixture(scope="module")
def cancelled_then_resumed(tmp_path_factory, require_resource):
    state = _cluster_state()
    require_resource(state == "up", state)  # tests/conftest.py: a failure in CI
    workdir = tmp_path_factory.mktemp("slurm")
    overlay = workdir / "two_tasks.yaml"
    overlay.write_text(TWO_TASKS)
    args = [*TEST_CLUSTER_ARGS, "--configfile", str(TINY_CONFIG), str(overlay)]

    first: dict[str, subprocess.CompletedProcess] = {}
    thread = threading.Thread(target=lambda: first.setdefault("run", snakemake(workdir, *args, check=False, timeout=900)))
    thread.start()
    # A checkpoint whose .sha256 exists is a finished save (the reader skips unfinished ones).
    checkpoints = lambda: sorted((workdir / f"results/work/pretrain/{RUN}").glob("*/checkpoint_*.pt.sha256"))  # noqa: E731
    job_logs = lambda: sorted((workdir / f".snakemake/slurm_logs/rule_pretrain/{RUN}").glob("*.log"))  # noqa: E731
    _wait_for(checkpoints, "pretraining checkpoint", 600, thread)
    job_id = _wait_for(job_logs, "pretrain job log", 60, thread).stem
    # The chunk outputs (not proposal stats, which may still be pending when pretraining starts).
    finished = sorted((workdir / "results").glob("shards/embedded/*.tar")) + sorted(
        (workdir / "results").glob("proposals/embedded/[0-9]*")
    )
    before = _mtimes(finished)
    subprocess.run(["scancel", job_id], check=True)
    thread.join(timeout=600)
    job_state = subprocess.run(["squeue", "--state=all", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)

    second = snakemake(workdir, *args, timeout=900)
    return {
        "workdir": workdir,
        "first": first["run"],
        "second": second,
        "job_state": job_state.stdout.strip(),
        "finished_before_cancel": before,
        "args": args,
    }


# Each process joins the process group the way pretraining does and all-reduces rank + 1.
# Each rank writes its line in one write() (atomic on a pipe): print() writes the text and the
# newline separately, so two ranks sharing stdout could interleave them.
ALL_REDUCE = """
import os, torch, torch.distributed as dist
from regioncl.engine.dist import read_dist_env, init_distributed
env = read_dist_env()
init_distributed(env, "cpu")
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)
os.write(1, f"{env.launcher} rank {env.rank} of {env.world_size}: sum {total.item():.0f}\\n".encode())
"""


@pytest.mark.parametrize(
    ("srun", "mode"),
    [
        (["--ntasks=2", "--cpus-per-task=1"], "per_task"),
        (["--ntasks=1", "--cpus-per-task=2"], "per_node"),
        (None, "standalone"),  # no cluster needed: torchrun --standalone on this machine
    ],
)
def test_launch_mode_gives_two_ranks_that_all_reduce(srun, mode, require_resource):
    command = ["python", "-c", ALL_REDUCE]
    if srun is None:
        launched = standalone_command(2, command, environ={})
    else:
        state = _cluster_state()
        require_resource(state == "up", state)
        launch = ["python", "-m", "regioncl.launch", f"--mode={mode}", "--nproc-per-node=2", "--rendezvous-port=29433"]
        launched = ["srun", "--kill-on-bad-exit=1", *srun, *launch, "--", *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launched, capture_output=True, text=True, timeout=300, env=env)
    launcher = "slurm" if mode == "per_task" else "torchrun"
    assert sorted(re.findall(r"^\w+ rank \d of \d: sum \d+$", result.stdout, re.MULTILINE)) == [
        f"{launcher} rank 0 of 2: sum 3",
        f"{launcher} rank 1 of 2: sum 3",
    ], result.stdout + result.stderr


def test_scancel_stops_the_workflow_with_the_job_cancelled(cancelled_then_resumed):
    assert cancelled_then_resumed["first"].returncode != 0
    assert cancelled_then_resumed["job_state"] == "CANCELLED"


def test_resumed_pretraining_starts_from_its_last_checkpoint_not_step_0(cancelled_then_resumed):
    log = (cancelled_then_resumed["workdir"] / f"results/logs/pretrain/{RUN}.log").read_text()
    resumed = re.search(r"resuming from step (\d+)", log)
    assert resumed and int(resumed.group(1)) > 0, log[-2000:]


def test_pretraining_ran_as_two_tasks_started_by_srun(cancelled_then_resumed):
    log = (cancelled_then_resumed["workdir"] / f"results/logs/pretrain/{RUN}.log").read_text()
    assert "launch (per_task, task 0)" in log and "launch (per_task, task 1)" in log
    assert (cancelled_then_resumed["workdir"] / f"results/pretrain/{RUN}/checkpoint_final.pt").is_file()


def test_tables_hold_random_and_moco_v2_with_the_evaluators_numbers(cancelled_then_resumed):
    workdir = cancelled_then_resumed["workdir"]
    table = pd.read_csv(workdir / "results/tables/summary.csv")
    assert list(table["method"]) == ["random", "moco_v2"] and list(table["run"]) == ["random", RUN]
    for run in ("random", RUN):
        metrics = json.loads((workdir / f"results/finetune/{run}/{BENCHMARK}/seed0/metrics.json").read_text())
        row = table[table["run"] == run].iloc[0]
        for name in ("AP", "AP50", "AP75"):
            assert row[f"box {name} mean"] == pytest.approx(metrics["metrics"]["bbox"][name], abs=1e-4)
    assert (workdir / "results/tables/summary.md").read_text().startswith("| method")


def test_cancel_lost_and_recomputed_nothing_that_had_finished(cancelled_then_resumed):
    before = cancelled_then_resumed["finished_before_cancel"]
    assert len(before) == 6  # 2 shards, 2 proposal parquets, 2 reports
    assert _mtimes(list(before)) == before
    assert "rule proposals" not in cancelled_then_resumed["second"].stdout + cancelled_then_resumed["second"].stderr


def test_finished_slurm_run_has_nothing_left_to_do(cancelled_then_resumed):
    result = snakemake(cancelled_then_resumed["workdir"], "-n", *cancelled_then_resumed["args"])
    assert "Nothing to be done" in result.stdout + result.stderr
