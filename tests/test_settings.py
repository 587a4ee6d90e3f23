"""Settings fail when the config is read, naming the key: wrong types, values out of range,
unknown method names, and settings that do not fit each other or the data."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from regioncl.config import ConfigError, WorkflowPlan
from regioncl.engine import PretrainSettings
from regioncl.transfer.benchmarks import BenchmarkSettings

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "workflow" / "tiny.yaml"


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base`` as Snakemake merges config files (mappings key by key)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_config(**overlay) -> dict:
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return merged(merged(base, yaml.safe_load(TINY.read_text())), overlay)


def plan_error(**overlay) -> str:
    with pytest.raises(ConfigError) as error:
        WorkflowPlan(tiny_config(**overlay), check_datasets=False)
    return str(error.value)


def pretrain_settings(**changes) -> dict:
    return {"method": "moco_v2", "epochs": 1, "method_params": {}, **changes}


def test_tiny_config_plans_without_errors():
    assert list(WorkflowPlan(tiny_config(), check_datasets=False).runs) == ["moco_v2_r18_2ep"]


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
