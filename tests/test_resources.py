"""Per-rule cluster resources from the config's `resources` section (regioncl/resources.py)."""

import pytest

from regioncl.resources import ClusterResources


def test_default_fills_what_a_rule_leaves_out_and_cpus_cover_the_rule_threads():
    cluster = ClusterResources(
        {"default": {"runtime": 30, "mem_mb": 2000, "cpus": 1, "partition": "cpu", "account": "lab"},
         "finetune": {"runtime": 600, "gpus": 2, "partition": "gpu"}},
        threads={"finetune": 4},
    )  # fmt: skip
    assert cluster.slurm("shards") == {
        "runtime": 30, "mem_mb": 2000, "cpus_per_task": 1, "slurm_partition": "cpu", "slurm_account": "lab",
    }  # fmt: skip
    assert cluster.slurm("finetune") == {
        "runtime": 600, "mem_mb": 2000, "cpus_per_task": 4, "slurm_partition": "gpu", "slurm_account": "lab",
        "gres": "gpu:2", "tasks_per_gpu": 0,
    }  # fmt: skip


def test_a_job_may_ask_fewer_gpus_than_its_rule():
    cluster = ClusterResources({"evaluate": {"gpus": 8}}, threads={})
    gres = cluster.slurm("evaluate", gpus_of_job=lambda wildcards: 1)["gres"]
    assert gres(None) == "gpu:1"
    assert "gres" not in ClusterResources({}, threads={}).slurm("evaluate", gpus_of_job=lambda wildcards: 1)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"proposals": {"gpus": 1}}, "resources.proposals.gpus: only ['pretrain', 'finetune', 'evaluate'] use GPUs"),
        ({"default": {"gpus": 1}}, "resources.default.gpus"),
        ({"finetune": {"nodes": 2}}, "resources.finetune.nodes: only ['pretrain']"),
        ({"finetune": {"tasks": 2}}, "resources.finetune: unknown key(s) ['tasks']"),
        ({"finetuning": {"runtime": 60}}, "resources: ['finetuning'] is not a rule"),
        ({"finetune": {"cpus": 2}}, "resources.finetune.cpus: 2 CPUs for a rule that runs 4 threads"),
        ({"pretrain": {"mem_mb": 0}}, "resources.pretrain.mem_mb: expected an integer >= 1"),
    ],
)
def test_a_resource_no_rule_reads_is_an_error_naming_the_key(section, message):
    with pytest.raises(ValueError) as error:
        ClusterResources(section, threads={"finetune": 4})
    assert message in str(error.value)
