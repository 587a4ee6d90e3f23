"""The DAG: what each config plans, and the errors raised before any job runs."""

import shutil
from pathlib import Path

from conftest import FIXTURE_DATASETS, ROOT, planned_jobs, snakemake


def _out(result) -> str:
    # Snakemake reports workflow errors on stdout, Python's on stderr.
    return result.stdout + result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_default_config_plans_every_stage(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, "-n").stdout)
    assert jobs == {
        "embedded_dataset": 1,
        "image_list": 1,
        "proposals": 4,
        "proposal_stats": 1,
        "shards": 4,
        "pretrain": 1,
        "convert": 1,
        "finetune": 2,  # moco_v2 and the random baseline
        "evaluate": 2,
        "tables": 1,
        "paper_tables": 1,
        "all": 1,
    }


def test_paper_config_plans_the_full_grid_on_the_real_layouts(tmp_path, roots_pointing_at_fixtures):
    result = snakemake(
        tmp_path, "-n", "-p", "--configfile", str(ROOT / "config/paper.yaml"), str(roots_pointing_at_fixtures)
    )
    jobs = planned_jobs(result.stdout)
    assert jobs["proposals"] == jobs["shards"] == 1024
    assert jobs["pretrain"] == jobs["convert"] == 3  # moco_v2 200 and 800 epochs, byol 300
    # (random + 3 runs) x (11 benchmarks x 1 seed + VOC x 5 seeds, as the papers average)
    assert jobs["finetune"] == jobs["evaluate"] == 4 * (11 + 5)
    assert "results/pretrain/moco_v2_r50_800ep/checkpoint_final.pt" in result.stdout
    assert "results/finetune/random/coco_mrcnn_r50fpn_1x/seed0/metrics.json" in result.stdout
    assert "results/finetune/moco_v2_r50_200ep/voc0712_frcnn_r50c4_24k/seed4/model.pt" in result.stdout
    # C4 protocols run on detectron2, which loads the .pkl conversion.
    assert "--weights results/weights/moco_v2_r50_200ep.d2.pkl" in result.stdout


def test_invalid_config_value_is_a_schema_error_naming_key_and_allowed_values(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "proposals:\n  settings:\n    selective_search: {mode: fastest}\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "fastest" in _out(result) and "selective_search" in _out(result) and "'quality'" in _out(result)


def test_unknown_stage_setting_is_named_before_any_job(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "pretrain:\n  defaults:\n    crop_sise: 64\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "crop_sise" in _out(result)


def test_unimplemented_method_is_an_error_naming_it(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "pretrain:\n  runs:\n    - {method: soco, epochs: 100}\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "method 'soco' is not implemented" in _out(result) and "moco_v2" in _out(result)


def test_undefined_benchmark_is_an_error_naming_it(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "finetune:\n  benchmarks: [voc07_frcnn_r50c4]\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "voc07_frcnn_r50c4" in _out(result)


def test_missing_dataset_root_fails_before_any_job_naming_path_and_layout(tmp_path, roots_pointing_at_fixtures):
    missing = _write(tmp_path / "missing.yaml", "datasets:\n  coco: {layout: coco, root: /nonexistent/coco}\n")
    result = snakemake(
        tmp_path, "-n", "--configfile", str(ROOT / "config/paper.yaml"), str(roots_pointing_at_fixtures), str(missing),
        check=False,
    )
    assert result.returncode != 0
    assert "/nonexistent/coco" in _out(result) and "instances_" in _out(result)
    assert not (tmp_path / "results").exists()


def test_malformed_annotation_file_fails_before_any_job(tmp_path, roots_pointing_at_fixtures):
    coco = tmp_path / "coco"
    shutil.copytree(FIXTURE_DATASETS / "coco", coco)
    (coco / "annotations" / "instances_val2017.json").write_text("not json")
    overlay = _write(tmp_path / "coco.yaml", f"datasets:\n  coco: {{layout: coco, root: {coco}}}\n")
    result = snakemake(
        tmp_path, "-n", "--configfile", str(ROOT / "config/paper.yaml"), str(roots_pointing_at_fixtures), str(overlay),
        check=False,
    )
    assert result.returncode != 0
    assert "instances_val2017.json is malformed" in _out(result)


def test_lint_reports_no_errors(tmp_path):
    result = snakemake(tmp_path, "--lint", check=False)
    assert result.returncode == 0, _out(result)
