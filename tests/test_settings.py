"""Settings fail when the config is read, naming the key: wrong types, values out of range,
unknown method names, and settings that do not fit each other or the data."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from regioncl.config import ConfigError, WorkflowPlan, merged_config_files
from regioncl.engine import PretrainSettings
from regioncl.transfer.benchmarks import BenchmarkSettings
from regioncl.transfer.registry import merged as package_merged

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "workflow" / "tiny.yaml"


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base`` as Snakemake merges config files (mappings key by key), deep-
    copied: the package's merge shares untouched sub-mappings, and tests edit the result."""
    return copy.deepcopy(package_merged(base, overlay))


def tiny_config(**overlay) -> dict:
    return merged(merged_config_files([TINY], base=ROOT / "config" / "config.yaml"), overlay)


def plan_error(**overlay) -> str:
    with pytest.raises(ConfigError) as error:
        WorkflowPlan(tiny_config(**overlay), check_datasets=False)
    return str(error.value)


def pretrain_settings(**changes) -> dict:
    return {"method": "moco_v2", "epochs": 1, "method_params": {}, **changes}


def test_tiny_config_plans_without_errors():
    assert list(WorkflowPlan(tiny_config(), check_datasets=False).runs) == ["moco_v2_r18_2ep"]


def test_config_files_merge_in_order_as_snakemake_merges_them(tmp_path: Path) -> None:
    """The benchmark scripts' config: later files win key by key inside mappings, lists are
    replaced whole, and an empty overlay changes nothing."""
    first = tmp_path / "first.yaml"
    first.write_text("pretrain: {threads: 2, runs: [{method: byol, epochs: 4}]}\nfinetune: {seeds: [0, 1, 2]}\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    config = merged_config_files([first, empty], base=ROOT / "config" / "config.yaml")
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert config["pretrain"]["threads"] == 2
    assert config["pretrain"]["runs"] == [{"method": "byol", "epochs": 4}]
    assert config["pretrain"]["defaults"] == base["pretrain"]["defaults"]  # kept beside the overlay's keys
    assert config["finetune"]["seeds"] == [0, 1, 2] and config["finetune"]["threads"] == base["finetune"]["threads"]
    assert merged_config_files([], base=ROOT / "config" / "config.yaml") == base


def test_finetune_num_workers_reaches_finetune_jobs_only():
    benchmark = "embedded_frcnn_r18fpn"  # torchvision: no GPU count either
    assert WorkflowPlan(tiny_config(), check_datasets=False).launch_args("finetune", benchmark) == ""
    plan = WorkflowPlan(tiny_config(finetune={"num_workers": 3}), check_datasets=False)
    assert plan.launch_args("finetune", benchmark) == "--num-workers 3"
    assert plan.launch_args("evaluate", benchmark) == ""


def test_a_string_for_a_number_is_an_error_naming_the_key():
    with pytest.raises(TypeError, match=r"BenchmarkSettings\.solver\.lr: expected a number, got '0\.01'"):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "solver": {"lr": "0.01"}})
    with pytest.raises(TypeError, match=r"pretrain\.optimizer\.momentum: expected a number, got 'abc'"):
        PretrainSettings.from_dict(pretrain_settings(optimizer={"momentum": "abc"}))
    with pytest.raises(TypeError, match=r"write the number without quotes"):
        PretrainSettings.from_dict(pretrain_settings(warmup_epochs="1e-4"))


def test_solver_lr_as_a_string_fails_the_plan_naming_solver_lr():
    message = plan_error(benchmarks={"embedded_frcnn_r18fpn": {"solver": {"lr": "0.01"}}})
    assert message.startswith("benchmarks.embedded_frcnn_r18fpn.solver.lr: expected a number")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"method_params": {"temperature": 0.0}}, r"method_params\.temperature: expected a value > 0, got 0\.0"),
        ({"method_params": {"momentum": 1.5}}, r"method_params\.momentum: expected a value >= 0 and <= 1"),
        ({"optimizer": {"momentum": -0.1}}, r"optimizer\.momentum: expected a value >= 0 and <= 1"),
        ({"optimizer": {"base_lr": -1.0}}, r"optimizer\.base_lr: expected a value >= 0"),
        ({"optimizer": {"weight_decay": -1e-4}}, r"optimizer\.weight_decay: expected a value >= 0"),
    ],
)
def test_pretrain_values_out_of_range_are_refused_with_the_range(changes, expected):
    with pytest.raises(ValueError, match=expected):
        PretrainSettings.from_dict(pretrain_settings(**changes))


@pytest.mark.parametrize(
    ("solver", "expected"),
    [
        ({"lr": 0.0}, r"solver\.lr: expected a value > 0"),
        ({"momentum": 2.0}, r"solver\.momentum: expected a value >= 0 and <= 1"),
        ({"weight_decay": -1.0}, r"solver\.weight_decay: expected a value >= 0"),
    ],
)
def test_solver_values_out_of_range_are_refused_with_the_range(solver, expected):
    with pytest.raises(ValueError, match=expected):
        BenchmarkSettings.from_dict({"name": "b", "dataset": {"root": "."}, "solver": solver})


def test_zero_temperature_fails_the_plan_before_any_job():
    assert "method_params.temperature: expected a value > 0" in plan_error(methods={"moco_v2": {"temperature": 0.0}})


def test_a_typo_under_methods_is_an_error_listing_the_registered_methods():
    message = plan_error(methods={"mocov2": {"queue_size": 16}})
    assert "methods: ['mocov2'] is not a registered method" in message
    assert "'moco_v2'" in message and "'byol'" in message


def test_a_queue_smaller_than_the_global_batch_fails_the_plan():
    message = plan_error(methods={"moco_v2": {"queue_size": 4}})
    assert "method_params.queue_size: 4 cannot hold the 8 keys of a global batch" in message


def test_a_batch_larger_than_the_embedded_images_fails_the_plan():
    message = plan_error(methods={"moco_v2": {"queue_size": 64}}, pretrain={"defaults": {"batch_size": 32}})
    assert "batch_size: 32 exceeds the 24 images of 'embedded'" in message


def test_more_chunks_than_images_fails_the_plan():
    assert "pretrain_data.chunks: 25 chunks of the 24 images" in plan_error(pretrain_data={"chunks": 25})


def test_the_documented_filelist_source_passes_the_schema_and_the_plan(tmp_path):
    listfile = tmp_path / "images.txt"
    listfile.write_text("a.jpg\n")
    config = tiny_config(datasets={"mine": {"layout": "filelist", "root": str(listfile)}}, pretrain_data={"dataset": "mine"})
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    assert WorkflowPlan(config).pretrain_dataset == "mine"


# A second pretraining dataset beside the embedded one (not listed: plans only, no jobs run).
SECOND_DATASET = {"more": {"layout": "folder", "root": "/nonexistent/more"}}


def two_dataset_plan(runs: list[dict], **overlay) -> WorkflowPlan:
    chunks = {"chunks": {"embedded": 2, "more": 3}}
    config = tiny_config(datasets=SECOND_DATASET, pretrain_data=chunks, pretrain={"runs": runs}, **overlay)
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return WorkflowPlan(config, check_datasets=False)


def test_the_one_dataset_form_chunks_the_default_dataset_only():
    plan = WorkflowPlan(tiny_config(), check_datasets=False)
    assert (plan.pretrain_dataset, plan.num_chunks("embedded")) == ("embedded", 2)
    assert plan.pretrain_data_products() == [
        "results/shards/embedded/00000.tar",
        "results/shards/embedded/00001.tar",
        "results/proposals/embedded/stats.json",
    ]


@pytest.mark.parametrize("chunks", [0, {"embedded": 0}, {}])
def test_the_schema_refuses_no_chunks_in_either_form(chunks):
    config = tiny_config(pretrain_data={"chunks": chunks})
    with pytest.raises(WorkflowError, match=r"pretrain_data'\]\['properties'\]\['chunks'\]"):
        validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))


MOCO_ON_BOTH = [{"method": "moco_v2", "epochs": 2}, {"method": "moco_v2", "epochs": 2, "dataset": "more"}]


def test_each_chunked_dataset_has_its_own_chunks_shards_and_stats():
    plan = two_dataset_plan(MOCO_ON_BOTH)
    assert (plan.num_chunks("embedded"), plan.num_chunks("more")) == (2, 3)
    assert plan.proposal_files("more", ".parquet") == [f"results/proposals/more/0000{i}.parquet" for i in range(3)]
    more_shards = [f"results/shards/more/0000{i}.tar" for i in range(3)]
    assert plan.shards_of(plan.run("moco_v2_r18_2ep_more").dataset) == more_shards
    stats = ["results/proposals/embedded/stats.json", "results/proposals/more/stats.json"]
    assert set(more_shards + stats) <= set(plan.pretrain_data_products())


def test_runs_on_another_dataset_than_the_default_are_named_after_it():
    """Same method, arch and epochs on two datasets: two runs, the default's keeping its name."""
    plan = two_dataset_plan(MOCO_ON_BOTH)
    assert {name: run.dataset for name, run in plan.runs.items()} == {
        "moco_v2_r18_2ep": "embedded", "moco_v2_r18_2ep_more": "more"
    }
    assert {job.run for job in plan.jobs} == {"random", "moco_v2_r18_2ep", "moco_v2_r18_2ep_more"}
    # Naming the default dataset explicitly is the same run as not naming it.
    on_default_twice = [MOCO_ON_BOTH[0], {**MOCO_ON_BOTH[0], "dataset": "embedded"}]
    message = plan_error(pretrain={"runs": on_default_twice})
    assert message == "pretrain.runs[1]: run name 'moco_v2_r18_2ep' is used twice"


def test_an_explicit_name_that_takes_another_runs_name_is_an_error():
    with pytest.raises(ConfigError, match=r"pretrain\.runs\[1\]: run name 'moco_v2_r18_2ep_more' is used twice"):
        two_dataset_plan([
            {"method": "moco_v2", "epochs": 2, "dataset": "more"},
            {"method": "moco_v2", "epochs": 3, "name": "moco_v2_r18_2ep_more"},
        ])


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ({"pretrain": {"runs": [{"method": "moco_v2", "epochs": 2, "dataset": "more"}]}},
         "pretrain.runs[0].dataset: 'more' is not chunked for pretraining; add it to pretrain_data.chunks "
         "(chunked: ['embedded'])"),
        ({"pretrain": {"runs": [{"method": "moco_v2", "epochs": 2, "dataset": "imagenet"}]}},
         "pretrain.runs[0].dataset: dataset 'imagenet' is not defined under `datasets` (['embedded', 'more'])"),
        ({"pretrain_data": {"chunks": {"embedded": 2, "coco": 3}}},
         "pretrain_data.chunks.coco: dataset 'coco' is not defined under `datasets` (['embedded', 'more'])"),
        ({"pretrain_data": {"chunks": {"more": 3}}},
         "pretrain_data.dataset: 'embedded' has no count under pretrain_data.chunks (['more']); "
         "the default dataset is chunked too"),
        ({"pretrain_data": {"chunks": {"embedded": 25, "more": 3}}},
         "pretrain_data.chunks.embedded: 25 chunks of the 24 images of 'embedded'; expected <= 24"),
        ({"datasets": {"voc": {"layout": "voc", "root": "/nonexistent/VOC"}},
          "pretrain_data": {"chunks": {"embedded": 2, "voc": 3}}},
         "pretrain_data.chunks.voc: dataset 'voc' has layout 'voc', which cannot be listed for pretraining; "
         "expected one of ['folder', 'imagenet', 'coco', 'embedded', 'filelist']"),
    ],
)  # fmt: skip
def test_pretrain_data_errors_name_the_key_and_what_is_chunked(overlay, expected):
    assert plan_error(**merged({"datasets": SECOND_DATASET}, overlay)) == expected


def test_a_runs_benchmarks_limit_its_finetunes_and_must_be_defined():
    first = tiny_config()["benchmarks"]["embedded_frcnn_r18fpn"]
    two_benchmarks = {
        # `unselected` is defined but not in finetune.benchmarks: skipped, like any unselected benchmark
        "benchmarks": {"second": first, "unselected": first},
        "finetune": {"benchmarks": ["embedded_frcnn_r18fpn", "second"]},
    }
    runs = [
        {"method": "moco_v2", "epochs": 2},
        {"method": "moco_v2", "epochs": 2, "dataset": "more", "benchmarks": ["second", "unselected"]},
    ]
    plan = two_dataset_plan(runs, **two_benchmarks)
    finetuned = {(job.run, job.benchmark) for job in plan.jobs if job.run != "random"}
    assert finetuned == {
        ("moco_v2_r18_2ep", "embedded_frcnn_r18fpn"), ("moco_v2_r18_2ep", "second"), ("moco_v2_r18_2ep_more", "second")
    }
    assert "benchmarks" not in plan.run("moco_v2_r18_2ep_more").settings  # the plan's, not the engine's
    with pytest.raises(ConfigError, match=r"pretrain\.runs\[0\]\.benchmarks: \['secnd'\] is not defined under"):
        two_dataset_plan([{"method": "moco_v2", "epochs": 2, "benchmarks": ["secnd"]}], **two_benchmarks)
