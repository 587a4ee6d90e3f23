"""What the SLURM profile would submit for the paper grid: every job's resources, read from a dry run."""

import re

import pytest
from conftest import ROOT, snakemake, write_backends_unchecked_overlay, write_roots_overlay

from regioncl.transfer.backends import backend_installed

SLURM = ["--profile", str(ROOT / "workflow/profiles/slurm")]
PAPER = str(ROOT / "config/paper.yaml")


def _job_resources(output: str) -> list[tuple[str, dict[str, str], str]]:
    """(rule, resources, the job's whole block) of every job in a dry run's listing."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\nrule \w+:)", output):
        rule = re.search(r"^rule (\w+):", block, re.MULTILINE)
        line = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if rule and line and rule.group(1) != "all":  # the target: no command, never submitted
            jobs.append((rule.group(1), dict(item.split("=", 1) for item in line.group(1).split(", ")), block))
    return jobs


@pytest.fixture(scope="module")
def paper_jobs(tmp_path_factory) -> list[tuple[str, dict[str, str], str]]:
    tmp = tmp_path_factory.mktemp("paper_slurm")
    overlays = [str(write_roots_overlay(tmp)), str(write_backends_unchecked_overlay(tmp))]
    result = snakemake(tmp, "-n", "-p", *SLURM, "--configfile", PAPER, *overlays)
    return _job_resources(result.stdout)


def test_every_paper_job_names_the_configured_partition_account_and_cpus(paper_jobs):
    rules = {rule for rule, _, _ in paper_jobs}
    assert {"proposals", "shards", "pretrain", "convert", "finetune", "evaluate", "tables", "paper_tables"} <= rules
    for rule, resources, _ in paper_jobs:
        assert resources.get("slurm_account") == "my_account", (rule, resources)
        expected_partition = "gpu" if rule in ("pretrain", "finetune", "evaluate") else "cpu"
        assert resources.get("slurm_partition") == expected_partition, (rule, resources)
        assert int(resources["cpus_per_task"]) >= 1, rule
    proposals = next(resources for rule, resources, _ in paper_jobs if rule == "proposals")
    assert (proposals["cpus_per_task"], proposals["runtime"], proposals["mem_mb"]) == ("8", "600", "16000")


def test_paper_gpu_jobs_request_gpus_and_pass_the_count_to_detectron2(paper_jobs):
    pretrain = [resources for rule, resources, _ in paper_jobs if rule == "pretrain"]
    assert pretrain and all(r["gres"] == "gpu:8" and r["cpus_per_task"] == "64" for r in pretrain)
    finetune = [(resources, block) for rule, resources, block in paper_jobs if rule == "finetune"]
    detectron2 = [(r, block) for r, block in finetune if '"backend": "detectron2"' in block]
    torchvision = [(r, block) for r, block in finetune if '"backend": "torchvision"' in block]
    assert detectron2, "the paper grid has detectron2 benchmarks"
    for resources, block in detectron2:
        assert resources["gres"] == "gpu:8" and resources["tasks_per_gpu"] == "0"
        assert "--num-gpus 8" in block
    for resources, block in torchvision:  # one GPU: the torchvision backend trains on one device
        assert resources["gres"] == "gpu:1" and "--num-gpus" not in block
    evaluate = [(resources, block) for rule, resources, block in paper_jobs if rule == "evaluate"]
    assert evaluate and all(r["gres"] == "gpu:1" for r, _ in evaluate)
    assert all("--num-gpus 1" in block for _, block in evaluate if '"backend": "detectron2"' in block)


@pytest.mark.skipif(backend_installed("detectron2"), reason="detectron2 is installed here")
def test_paper_dry_run_without_detectron2_fails_before_any_job_naming_benchmarks_and_install(
    tmp_path, roots_pointing_at_fixtures
):
    result = snakemake(tmp_path, "-n", *SLURM, "--configfile", PAPER, str(roots_pointing_at_fixtures), check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "backend 'detectron2' is not installed" in out and "voc0712_frcnn_r50c4_24k" in out
    assert "pip install --no-build-isolation" in out and "check_backends: false" in out
    assert "Job stats" not in out and not (tmp_path / "results").exists()
