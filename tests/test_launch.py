"""Launch modes: which processes a pretraining job starts, and what it asks SLURM for."""

import shlex
import sys

import pytest

from regioncl.launch import LaunchPlan, LaunchSettings, standalone_command, task_command

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
COMMAND = ["python", "-m", "regioncl.cli", "pretrain", "--out", "x.pt"]
TWO_NODE_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
}


def plan(mode, nodes=1, nproc=1, gpus=0, cpus=4):
    return LaunchPlan.build(LaunchSettings(mode=mode), nodes=nodes, nproc_per_node=nproc, gpus_per_node=gpus, cpus_per_task=cpus)


def test_standalone_with_one_process_runs_the_command_as_is():
    assert standalone_command(1, COMMAND, environ={}) is None


def test_standalone_with_n_processes_uses_torchrun_standalone():
    assert standalone_command(4, COMMAND, environ={}) == [*TORCHRUN, "--standalone", "--nproc-per-node=4", "--no-python", *COMMAND]


@pytest.mark.parametrize("environ", [{"RANK": "0", "WORLD_SIZE": "4"}, {"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}])
def test_a_process_already_launched_distributed_is_not_launched_again(environ):
    assert standalone_command(4, COMMAND, environ=environ) is None


def test_per_node_runs_torchrun_with_a_c10d_rendezvous_on_the_first_host():
    settings = LaunchSettings(mode="per_node", rendezvous_port=29411)
    assert task_command(settings, 8, COMMAND, environ=TWO_NODE_JOB) == [
        *TORCHRUN,
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu07:29411",
        "--rdzv-id=4242",
        "--no-python",
        *COMMAND,
    ]


def test_per_node_refuses_more_than_one_task_per_node():
    with pytest.raises(RuntimeError, match="one task per node.*SLURM_NTASKS=4"):
        task_command(LaunchSettings(mode="per_node"), 2, COMMAND, environ={**TWO_NODE_JOB, "SLURM_NTASKS": "4"})


def test_per_task_runs_the_command_itself_as_each_rank():
    assert task_command(LaunchSettings(mode="per_task"), 2, COMMAND, environ=TWO_NODE_JOB) == COMMAND


def test_multi_task_modes_outside_slurm_say_what_is_missing():
    with pytest.raises(RuntimeError, match=r"'per_task'.*SLURM_JOB_ID.*use mode 'standalone'"):
        task_command(LaunchSettings(mode="per_task"), 2, COMMAND, environ={})


def test_standalone_job_is_one_task_without_srun():
    launch = plan("standalone", nproc=4, gpus=4, cpus=16)
    assert launch.step_prefix() == ""
    assert launch.slurm_resources() == {"nodes": 1, "tasks": 1, "cpus_per_task": 16, "gres": "gpu:4", "tasks_per_gpu": 0}


def test_standalone_refuses_several_nodes():
    with pytest.raises(ValueError, match="'standalone' runs on one node.*nodes is 2"):
        plan("standalone", nodes=2)


def test_per_node_job_is_one_mpi_task_per_node():
    launch = plan("per_node", nodes=2, nproc=8, gpus=8, cpus=64)
    assert launch.slurm_resources() == {
        "nodes": 2,
        "tasks": 2,
        "cpus_per_task": 64,
        "mpi": "srun",
        "gres": "gpu:8",
        "tasks_per_gpu": 0,
    }
    assert shlex.split(launch.step_prefix()) == [
        "srun", "--kill-on-bad-exit=1", "--ntasks=2", "--cpus-per-task=64", "--ntasks-per-node=1",
        "python", "-m", "regioncl.launch", "--mode=per_node", "--nproc-per-node=8", "--rendezvous-port=29400", "--",
    ]  # fmt: skip


def test_per_task_job_is_one_task_per_process():
    launch = plan("per_task", nodes=2, nproc=4, cpus=1)
    assert launch.tasks == 8
    assert launch.slurm_resources() == {"nodes": 2, "tasks": 8, "cpus_per_task": 1, "mpi": "srun"}
    assert shlex.split(launch.step_prefix())[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks=8", "--cpus-per-task=1"]


@pytest.mark.parametrize("mode", ["per_node", "per_task"])
def test_a_multi_task_mode_with_one_task_is_standalone(mode):
    # The plugin rejects `mpi` jobs of one task; torchrun --standalone starts the same processes.
    launch = plan(mode, nodes=1, nproc=1 if mode == "per_task" else 4)
    assert launch.mode == "standalone" and launch.step_prefix() == "" and "mpi" not in launch.slurm_resources()


def test_unknown_mode_is_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"pretrain.launch.mode: expected one of \['standalone', 'per_node', 'per_task'\]"):
        LaunchSettings.from_dict({"mode": "mpirun"})
