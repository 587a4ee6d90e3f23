"""The DAG: what each config plans, and the errors raised before any job runs."""

import re
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
    assert jobs["image_list"] == 2  # ImageNet and COCO train2017, each chunked for pretraining
    assert jobs["proposals"] == jobs["shards"] == 1024 + 96
    # IN-1K: moco_v2 200 and 800 epochs, byol 300, detco 100, 200 and 800, dupr 200, resim_c4 200,
    # resim_fpn 200, soco 100 and 400, soco* 400, soco_c4 100 and 400, plrc 200; COCO (PLRC Tab. 2):
    # moco_v2, byol and plrc 800 COCO-epochs
    assert jobs["pretrain"] == 15 + 3
    assert jobs["convert"] == 15 + 3 + 1  # and torchvision's ImageNet R50 for the supervised baseline
    # (random + supervised_r50 + 15 IN-1K runs) x (11 benchmarks x 1 seed + VOC x 5 seeds, as the
    # papers average); Cityscapes semantic segmentation x 5 seeds for the methods of PLRC's rows
    # (random, supervised, moco_v2 x 2, byol, detco x 3, soco_c4 x 2, plrc: 11 runs); resim_fpn on
    # the two backbone-only COCO variants (ReSim-FPN beside ReSim-FPN^T); and the 3 COCO runs on
    # PLRC Tab. 2's tasks only (VOC x 5, COCO C4 1x, Cityscapes x 5)
    assert jobs["finetune"] == jobs["evaluate"] == 17 * (11 + 5) + 11 * 5 + 2 + 3 * (5 + 1 + 5)
    assert "results/finetune/dupr_r50_200ep/cityscapes_semseg" not in result.stdout  # not in PLRC's rows
    assert "--supervised torchvision:IMAGENET1K_V1 --arch resnet50" in result.stdout
    assert "--weights results/weights/supervised_r50.d2.pkl" in result.stdout  # the Supervised rows
    assert "results/pretrain/moco_v2_r50_800ep/checkpoint_final.pt" in result.stdout
    for epochs in (100, 200, 800):  # DetCo Tab. 6 rows (200 also Tab. 4)
        assert f"results/finetune/detco_r50_{epochs}ep/voc0712_frcnn_r50c4_24k/seed4/model.pt" in result.stdout
    assert "results/finetune/dupr_r50_200ep/coco_mrcnn_r50fpn_1x/seed0/metrics.json" in result.stdout  # DUPR Tab. 3, 9a
    for row in ("voc0712_frcnn_r50c4_24k/seed4", "coco_mrcnn_r50c4_1x/seed0", "cityscapes_semseg/seed4"):  # PLRC Tab. 1
        assert f"results/finetune/plrc_r50_200ep/{row}/metrics.json" in result.stdout, row
    for run in ("random", "supervised_r50", "moco_v2_r50_800ep", "detco_r50_200ep", "soco_c4_r50_100ep"):  # its other rows
        assert f"results/finetune/{run}/cityscapes_semseg/seed4/metrics.json" in result.stdout, run
    # Its Cityscapes column is the dilated FCN, on the torchvision backend: the .tv.pth conversion.
    assert "--weights results/weights/plrc_r50_200ep.tv.pth" in result.stdout
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
    _assert_coco_pretraining_planned(result.stdout)


def _assert_coco_pretraining_planned(stdout: str) -> None:
    """PLRC Tab. 2: three runs on COCO train2017's 96 chunks (the IN-1K runs keep their names and
    ImageNet's 1,024), each finetuned on the table's tasks only."""
    coco_runs = ("moco_v2_r50_800ep_coco", "byol_r50_800ep_coco", "plrc_r50_800ep_coco")
    assert "--layout coco" in stdout and "--out results/lists/coco.tsv" in stdout
    assert "--list results/lists/coco.tsv --chunk 00095 --num-chunks 96" in stdout
    assert "--list results/lists/imagenet.tsv --chunk 01023 --num-chunks 1024" in stdout
    pretrain_lines = {
        run: line for run in coco_runs for line in stdout.splitlines()
        if f"--out results/pretrain/{run}/checkpoint_final.pt" in line
    }
    assert set(pretrain_lines) == set(coco_runs)
    for run, line in pretrain_lines.items():
        assert "results/shards/coco/00000.tar" in line and "results/shards/coco/00095.tar" in line, run
        assert "results/shards/imagenet/" not in line, run
    assert '"distill_warmup_epochs": 30' in pretrain_lines["plrc_r50_800ep_coco"]  # 30 COCO-epochs
    imagenet_line = next(line for line in stdout.splitlines() if "--out results/pretrain/moco_v2_r50_800ep/" in line)
    assert "results/shards/imagenet/01023.tar" in imagenet_line and "results/shards/coco/" not in imagenet_line
    finetuned = set(re.findall(r"results/finetune/(\w+_coco)/(\w+)/seed\d+/metrics\.json", stdout))
    tasks = ("voc0712_frcnn_r50c4_24k", "coco_mrcnn_r50c4_1x", "cityscapes_semseg")
    assert finetuned == {(run, benchmark) for run in coco_runs for benchmark in tasks}


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
