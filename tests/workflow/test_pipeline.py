"""The whole pipeline, for real, on a tiny config: tables from the evaluator, incremental re-runs."""

import json

import pandas as pd
import pytest
from conftest import TINY_CONFIG, planned_jobs, snakemake

RUN = "moco_v2_r18_2ep"
BENCHMARK = "embedded_frcnn_r18fpn"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY_CONFIG))
    return workdir


def test_tables_hold_random_and_moco_v2_with_the_evaluators_numbers(finished_run):
    summary = (finished_run / "results/tables/summary.md").read_text()
    header = summary.splitlines()[0]
    for column in ("method", "box AP", "box AP50", "box AP75"):
        assert column in header
    table = pd.read_csv(finished_run / "results/tables/summary.csv")
    assert list(table["method"]) == ["random", "moco_v2"]
    for run in ("random", RUN):
        metrics = json.loads((finished_run / f"results/finetune/{run}/{BENCHMARK}/seed0/metrics.json").read_text())
        row = table[table["run"] == run].iloc[0]
        for name in ("AP", "AP50", "AP75"):
            assert row[f"box {name} mean"] == pytest.approx(metrics["metrics"]["bbox"][name], abs=1e-4)


def test_every_stage_left_its_output(finished_run):
    results = finished_run / "results"
    assert (results / "data/embedded/annotations/instances_val.json").is_file()
    assert sorted(p.name for p in (results / "shards/embedded").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (results / f"pretrain/{RUN}/checkpoint_final.pt").is_file()
    assert (results / f"weights/{RUN}.tv.pth").is_file() and (results / f"weights/{RUN}.d2.pkl").is_file()
    # Resumable checkpoints live outside the declared outputs.
    assert list((results / f"work/pretrain/{RUN}").glob("*/checkpoint_*.pt"))


def test_second_run_has_nothing_to_do(finished_run):
    result = snakemake(finished_run, "-n", "--configfile", str(TINY_CONFIG))
    assert "Nothing to be done" in result.stdout + result.stderr


def test_deleting_one_shard_reruns_only_that_shard_and_its_dependents(finished_run):
    random_model = finished_run / f"results/finetune/random/{BENCHMARK}/seed0/model.pt"
    untouched = {
        path: path.stat().st_mtime_ns
        for path in [random_model, finished_run / "results/shards/embedded/00000.tar"]
    }
    shard = finished_run / "results/shards/embedded/00001.tar"
    before = shard.read_bytes()
    shard.unlink()
    plan = planned_jobs(snakemake(finished_run, "-n", "--configfile", str(TINY_CONFIG)).stdout)
    assert plan == {
        "shards": 1, "pretrain": 1, "convert": 1, "finetune": 1, "evaluate": 1, "tables": 1, "paper_tables": 1, "all": 1
    }

    snakemake(finished_run, "--cores", "2", "--configfile", str(TINY_CONFIG))
    assert shard.read_bytes() == before  # shards are byte-reproducible
    assert {path: path.stat().st_mtime_ns for path in untouched} == untouched
