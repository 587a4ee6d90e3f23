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
        "probe": 2,  # the same two backbones, frozen
        "tables": 1,
        "paper_tables": 1,
        "curves": 1,
        "all": 1,
    }


def test_paper_config_plans_the_full_grid_on_the_real_layouts(tmp_path, roots_pointing_at_fixtures, backends_unchecked):
    result = snakemake(
        tmp_path, "-n", "-p", "--configfile", str(ROOT / "config/paper.yaml"), str(roots_pointing_at_fixtures),
        str(backends_unchecked),
    )
    jobs = planned_jobs(result.stdout)
    assert jobs["proposals"] == jobs["shards"] == 1024
    # moco_v2 200 and 800 epochs, byol 300, detco 100, 200 and 800, dupr 200, resim_c4 200, resim_fpn 200,
    # soco 100 and 400, soco* 400, soco_c4 100 and 400, plrc 200
    assert jobs["pretrain"] == 15
    assert jobs["convert"] == 15 + 1  # and torchvision's ImageNet R50 for the supervised baseline
    # (random + supervised_r50 + 15 runs) x (11 benchmarks x 1 seed + VOC x 5 seeds, as the papers
    # average), and resim_fpn on the two backbone-only COCO variants (ReSim-FPN beside ReSim-FPN^T)
    assert jobs["finetune"] == jobs["evaluate"] == 17 * (11 + 5) + 2
    assert "--supervised torchvision:IMAGENET1K_V1 --arch resnet50" in result.stdout
    assert "--weights results/weights/supervised_r50.d2.pkl" in result.stdout  # the Supervised rows
    assert "results/pretrain/moco_v2_r50_800ep/checkpoint_final.pt" in result.stdout
    for epochs in (100, 200, 800):  # DetCo Tab. 6 rows (200 also Tab. 4)
        assert f"results/finetune/detco_r50_{epochs}ep/voc0712_frcnn_r50c4_24k/seed4/model.pt" in result.stdout
    assert "results/finetune/dupr_r50_200ep/coco_mrcnn_r50fpn_1x/seed0/metrics.json" in result.stdout  # DUPR Tab. 3, 9a
    for row in ("voc0712_frcnn_r50c4_24k/seed4", "coco_mrcnn_r50c4_1x/seed0"):  # PLRC Tab. 1
        assert f"results/finetune/plrc_r50_200ep/{row}/metrics.json" in result.stdout, row
    for row in (  # ReSim Tab. 4 and 5 (C4, FPN, FPN^T), SoCo Tab. 1 (FPN^T) and 3 (C4)
        "resim_c4_r50_200ep/voc0712_frcnn_r50c4_24k/seed4", "resim_fpn_r50_200ep/voc0712_frcnn_r50c4_24k/seed4",
        "resim_c4_r50_200ep/coco_mrcnn_r50fpn_2x/seed0", "resim_fpn_r50_200ep/coco_mrcnn_r50fpn_2x_backbone/seed0",
        "resim_fpn_r50_200ep/coco_mrcnn_r50fpn_1x/seed0", "resim_fpn_r50_200ep/coco_mrcnn_r50fpn_soco_2x/seed0",
    ):
        assert f"results/finetune/{row}/metrics.json" in result.stdout, row
    assert "results/finetune/moco_v2_r50_200ep/coco_mrcnn_r50fpn_1x_backbone" not in result.stdout  # resim_fpn only
    for run in ("soco_r50_100ep", "soco_r50_400ep", "soco_star_r50_400ep"):  # SoCo Tab. 1 (FPN)
        for schedule in ("1x", "2x"):
            assert f"results/finetune/{run}/coco_mrcnn_r50fpn_soco_{schedule}/seed0/metrics.json" in result.stdout, run
    for run in ("soco_c4_r50_100ep", "soco_c4_r50_400ep"):  # SoCo Tab. 2 and 3 (C4), PLRC Tab. 1 (100 ep)
        assert f"results/finetune/{run}/coco_mrcnn_r50c4_2x/seed0/metrics.json" in result.stdout, run
        assert f"results/finetune/{run}/voc0712_frcnn_r50c4_24k/seed4/metrics.json" in result.stdout, run
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
    bad = _write(tmp_path / "bad.yaml", "pretrain:\n  runs:\n    - {method: simclr, epochs: 100}\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "method 'simclr' is not implemented" in _out(result) and "moco_v2" in _out(result)


def test_undefined_benchmark_is_an_error_naming_it(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "finetune:\n  benchmarks: [voc07_frcnn_r50c4]\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "voc07_frcnn_r50c4" in _out(result)


def test_a_benchmarks_methods_limit_its_finetunes_and_must_be_known(tmp_path):
    only = _write(tmp_path / "only.yaml", "benchmarks:\n  embedded_frcnn_r18fpn: {dataset: embedded, methods: [random]}\n")
    assert planned_jobs(snakemake(tmp_path, "-n", "--configfile", str(only)).stdout)["finetune"] == 1  # not moco_v2
    bad = _write(tmp_path / "bad.yaml", "benchmarks:\n  embedded_frcnn_r18fpn: {dataset: embedded, methods: [simclr]}\n")
    result = snakemake(tmp_path, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "benchmarks.embedded_frcnn_r18fpn.methods: ['simclr'] is not a registered method or baseline" in _out(result)


def test_missing_dataset_root_fails_before_any_job_naming_path_and_layout(
    tmp_path, roots_pointing_at_fixtures, backends_unchecked
):
    missing = _write(tmp_path / "missing.yaml", "datasets:\n  coco: {layout: coco, root: /nonexistent/coco}\n")
    result = snakemake(
        tmp_path, "-n", "--configfile", str(ROOT / "config/paper.yaml"), str(roots_pointing_at_fixtures),
        str(backends_unchecked), str(missing), check=False,
    )
    assert result.returncode != 0
    assert "/nonexistent/coco" in _out(result) and "instances_" in _out(result)
    assert not (tmp_path / "results").exists()


def test_malformed_annotation_file_fails_before_any_job(tmp_path, roots_pointing_at_fixtures, backends_unchecked):
    coco = tmp_path / "coco"
    shutil.copytree(FIXTURE_DATASETS / "coco", coco)
    (coco / "annotations" / "instances_val2017.json").write_text("not json")
    overlay = _write(tmp_path / "coco.yaml", f"datasets:\n  coco: {{layout: coco, root: {coco}}}\n")
    result = snakemake(
        tmp_path, "-n", "--configfile", str(ROOT / "config/paper.yaml"), str(roots_pointing_at_fixtures),
        str(backends_unchecked), str(overlay), check=False,
    )
    assert result.returncode != 0
    assert "instances_val2017.json is malformed" in _out(result)


def test_lint_reports_no_errors(tmp_path):
    result = snakemake(tmp_path, "--lint", check=False)
    assert result.returncode == 0, _out(result)
