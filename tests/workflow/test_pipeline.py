"""The whole pipeline, for real, on a tiny config: tables from the evaluator, incremental re-runs.

The run is conftest's session-wide ``tiny_run`` (test_report.py reads it too)."""

import json
import math

import pandas as pd
import pytest
from conftest import ROOT, TINY_CONFIG, planned_jobs, snakemake

RUN = "moco_v2_r18_2ep"
BENCHMARK = "embedded_frcnn_r18fpn"


def test_tables_hold_random_and_moco_v2_with_the_evaluators_numbers(tiny_run):
    summary = (tiny_run / "results/tables/summary.md").read_text()
    header = summary.splitlines()[0]
    for column in ("method", "box AP", "box AP50", "box AP75"):
        assert column in header
    table = pd.read_csv(tiny_run / "results/tables/summary.csv")
    assert list(table["method"]) == ["random", "moco_v2"]
    for run in ("random", RUN):
        metrics = json.loads((tiny_run / f"results/finetune/{run}/{BENCHMARK}/seed0/metrics.json").read_text())
        row = table[table["run"] == run].iloc[0]
        for name in ("AP", "AP50", "AP75"):
            assert row[f"box {name} mean"] == pytest.approx(metrics["metrics"]["bbox"][name], abs=1e-4)


def test_every_stage_left_its_output(tiny_run):
    results = tiny_run / "results"
    assert (results / "data/embedded/annotations/instances_val.json").is_file()
    assert sorted(p.name for p in (results / "shards/embedded").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (results / f"pretrain/{RUN}/checkpoint_final.pt").is_file()
    assert (results / f"weights/{RUN}.tv.pth").is_file() and (results / f"weights/{RUN}.d2.pkl").is_file()
    # Resumable checkpoints live outside the declared outputs.
    assert list((results / f"work/pretrain/{RUN}").glob("*/checkpoint_*.pt"))


def test_training_curves_are_outputs_with_moco_v2s_chance_level(tiny_run):
    results = tiny_run / "results"
    pretrain = [json.loads(line) for line in (results / f"metrics/pretrain/{RUN}.jsonl").read_text().splitlines()]
    # 24 images, batch 8, 2 epochs; chance is ln(1 + queue 16)
    assert [record["step"] for record in pretrain] == list(range(1, 7))
    assert all(record["chance_loss"] == pytest.approx(math.log(17)) and record["lr"] > 0 for record in pretrain)
    for run in ("random", RUN):
        finetune = (results / f"metrics/finetune/{run}/{BENCHMARK}/seed0.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in finetune] == [1, 2, 3, 4]  # tiny.yaml: 4 iterations
        assert {"loss", "lr", "loss_classifier", "loss_rpn_box_reg"} <= set(json.loads(finetune[-1]))
    for plot in ("pretrain_curves.svg", f"finetune_curves_{BENCHMARK}.svg"):
        assert "<svg" in (results / "plots" / plot).read_text()


def test_no_log_line_is_longer_than_1000_characters(tiny_run):
    logs = sorted((tiny_run / "results/logs").rglob("*.log"))
    assert len(logs) >= 10
    for log in logs:
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), start=1):
            assert len(line) <= 1000 and "\r" not in line, f"{log}:{number}: {len(line)} characters"


def test_a_changed_setting_reruns_its_jobs_and_dependents_under_the_slurm_profile(tiny_run, tmp_path):
    overlay = tmp_path / "lr.yaml"
    overlay.write_text("benchmarks:\n  embedded_frcnn_r18fpn:\n    solver: {lr: 0.005}\n")
    args = ["--profile", str(ROOT / "workflow/profiles/slurm"), "--slurm-no-account"]
    result = snakemake(tiny_run, "-n", *args, "--configfile", str(TINY_CONFIG), str(overlay))
    plan = planned_jobs(result.stdout)
    assert plan["finetune"] == plan["evaluate"] == 2 and plan["tables"] == plan["curves"] == 1
    assert "pretrain" not in plan and "shards" not in plan


def test_second_run_has_nothing_to_do(tiny_run):
    result = snakemake(tiny_run, "-n", "--configfile", str(TINY_CONFIG))
    assert "Nothing to be done" in result.stdout + result.stderr


def test_deleting_one_shard_reruns_only_that_shard_and_its_dependents(tiny_run_copy):
    # A copy: this test deletes and rebuilds outputs.
    random_model = tiny_run_copy / f"results/finetune/random/{BENCHMARK}/seed0/model.pt"
    untouched = {
        path: path.stat().st_mtime_ns
        for path in [random_model, tiny_run_copy / "results/shards/embedded/00000.tar"]
    }
    shard = tiny_run_copy / "results/shards/embedded/00001.tar"
    before = shard.read_bytes()
    shard.unlink()
    plan = planned_jobs(snakemake(tiny_run_copy, "-n", "--configfile", str(TINY_CONFIG)).stdout)
    assert plan == {
        "shards": 1, "pretrain": 1, "probe": 1, "convert": 1, "finetune": 1, "evaluate": 1, "tables": 1, "paper_tables": 1,
        "curves": 1, "all": 1,
    }

    snakemake(tiny_run_copy, "--cores", "2", "--configfile", str(TINY_CONFIG))
    assert shard.read_bytes() == before  # shards are byte-reproducible
    assert {path: path.stat().st_mtime_ns for path in untouched} == untouched
