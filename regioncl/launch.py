"""How a pretraining job starts its processes: one process, torchrun on one node, or SLURM tasks.

Modes (config key ``pretrain.launch.mode``), with N = ``pretrain.nproc_per_node`` processes per
node (one per GPU) and M = ``resources.pretrain.nodes``:

- ``standalone``: one node. N = 1 runs in this process; N > 1 re-launches the command under
  ``torchrun --standalone`` (works locally and as a one-task SLURM job).
- ``per_node``: M SLURM tasks, one per node (``srun --ntasks-per-node=1``); each runs
  ``torchrun --nnodes=M --nproc-per-node=N`` with a c10d rendezvous on the first host of
  ``$SLURM_JOB_NODELIST``. Ranks come from torchrun.
- ``per_task``: M x N SLURM tasks, one process each (``srun``); rank and world size come from
  ``SLURM_PROCID``/``SLURM_NTASKS`` (see ``regioncl.engine.dist.read_dist_env``).

The pretrain rule asks this module for its SLURM resources (:func:`slurm_resources`) and for
the shell prefix that starts the tasks (:func:`step_prefix`); inside each task
``python -m regioncl.launch`` turns the SLURM environment into the torchrun command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from regioncl.settings import Settings

LaunchMode = Literal["standalone", "per_node", "per_task"]
MULTI_TASK_MODES = ("per_node", "per_task")


@dataclass(frozen=True)
class LaunchSettings(Settings):
    section: ClassVar[str] = "pretrain.launch"

    mode: LaunchMode = "standalone"
    rendezvous_port: int = 29400  # c10d rendezvous on the first node (per_node mode)


def _torchrun() -> list[str]:
    # The torchrun of this interpreter's environment, whatever is first on PATH.
    return [sys.executable, "-m", "torch.distributed.run"]


def launched_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a torchrun worker or one task of a multi-task SLURM step (the rank is in the env)."""
    return "RANK" in environ or int(environ.get("SLURM_NTASKS", "1")) > 1


def standalone_command(nproc_per_node: int, command: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str] | None:
    """``command`` under ``torchrun --standalone`` when it needs N > 1 local processes; None to run it as is."""
    if nproc_per_node <= 1 or launched_distributed(environ):
        return None
    return [*_torchrun(), "--standalone", f"--nproc-per-node={nproc_per_node}", "--no-python", *command]


def relaunch_if_needed(nproc_per_node: int, cli_args: Sequence[str]) -> None:
    """Replace this process by ``regioncl <cli_args>`` under ``torchrun --standalone`` when N > 1; else return."""
    command = standalone_command(nproc_per_node, [sys.executable, "-m", "regioncl.cli", *cli_args])
    if command is not None:
        # exec, not a child: a kill or scancel reaches torchrun, which stops its workers.
        os.execvp(command[0], command)


def task_command(
    settings: LaunchSettings, nproc_per_node: int, command: Sequence[str], environ: Mapping[str, str] = os.environ
) -> list[str]:
    """What one SLURM task of a multi-task step runs to start its share of the processes."""
    from regioncl.engine.dist import expand_slurm_nodelist

    needed = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_PROCID", "SLURM_NTASKS")
    missing = [name for name in needed if name not in environ]
    if missing:
        raise RuntimeError(
            f"pretrain.launch.mode {settings.mode!r} runs as the tasks of a SLURM job step (srun), "
            f"but {missing} are not set; use mode 'standalone' outside SLURM"
        )
    if settings.mode == "per_task":
        return list(command)
    nodes = int(environ["SLURM_NNODES"])
    if int(environ["SLURM_NTASKS"]) != nodes:
        raise RuntimeError(
            f"pretrain.launch.mode 'per_node' expects one task per node, got SLURM_NTASKS={environ['SLURM_NTASKS']} "
            f"on SLURM_NNODES={nodes}"
        )
    host = expand_slurm_nodelist(environ["SLURM_JOB_NODELIST"])[0]
    return [
        *_torchrun(),
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{settings.rendezvous_port}",
        f"--rdzv-id={environ['SLURM_JOB_ID']}",
        "--no-python",
        *command,
    ]


@dataclass(frozen=True)
class LaunchPlan:
    """The pretraining job's shape on SLURM: ``tasks`` tasks over ``nodes`` nodes, each with ``cpus_per_task`` CPUs."""

    mode: LaunchMode
    nodes: int
    nproc_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    rendezvous_port: int

    @classmethod
    def build(
        cls, settings: LaunchSettings, nodes: int, nproc_per_node: int, gpus_per_node: int, cpus_per_task: int
    ) -> LaunchPlan:
        mode = settings.mode
        if mode == "standalone" and nodes != 1:
            raise ValueError(
                f"pretrain.launch.mode: 'standalone' runs on one node, but resources.pretrain.nodes is {nodes}; "
                "use 'per_node' or 'per_task'"
            )
        if mode in MULTI_TASK_MODES and cls._tasks(mode, nodes, nproc_per_node) == 1:
            mode = "standalone"  # one task: torchrun --standalone (N > 1) or one process does the same
        return cls(mode, nodes, nproc_per_node, gpus_per_node, cpus_per_task, settings.rendezvous_port)

    @staticmethod
    def _tasks(mode: str, nodes: int, nproc_per_node: int) -> int:
        return {"standalone": 1, "per_node": nodes, "per_task": nodes * nproc_per_node}[mode]

    @property
    def tasks(self) -> int:
        return self._tasks(self.mode, self.nodes, self.nproc_per_node)

    def slurm_resources(self) -> dict[str, Any]:
        """The rule's resources for the SLURM executor plugin (besides runtime and memory).

        Multi-task modes set ``mpi``: the plugin then runs the rule's shell command in the
        batch step, whose ``srun`` starts the tasks (without it, the plugin's own ``srun -n1``
        step holds the allocation and the job hangs). GPUs are requested per node as ``gres``,
        with ``tasks_per_gpu=0`` so the plugin adds no ``--ntasks-per-gpu`` of its own.
        """
        resources: dict[str, Any] = {"nodes": self.nodes, "tasks": self.tasks, "cpus_per_task": self.cpus_per_task}
        if self.mode in MULTI_TASK_MODES:
            resources["mpi"] = "srun"
        if self.gpus_per_node > 0:
            resources["gres"] = f"gpu:{self.gpus_per_node}"
            resources["tasks_per_gpu"] = 0
        return resources

    def step_prefix(self) -> str:
        """Shell words put before ``python -m regioncl.cli pretrain ...`` in the rule ('' for standalone).

        srun does not inherit ``--cpus-per-task`` from the batch allocation (SLURM >= 22.05), so
        it is passed again; ``--kill-on-bad-exit`` ends every task when one fails instead of
        leaving the others waiting in a collective.
        """
        if self.mode == "standalone":
            return ""
        srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks={self.tasks}", f"--cpus-per-task={self.cpus_per_task}"]
        if self.mode == "per_node":
            srun.append("--ntasks-per-node=1")
        launcher = [
            "python", "-m", "regioncl.launch",
            f"--mode={self.mode}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--rendezvous-port={self.rendezvous_port}",
            "--",
        ]  # fmt: skip
        return shlex.join([*srun, *launcher])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m regioncl.launch", description="Start one SLURM task's share of a distributed command."
    )
    parser.add_argument("--mode", choices=MULTI_TASK_MODES, required=True)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rendezvous-port", type=int, default=LaunchSettings.rendezvous_port)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    settings = LaunchSettings(mode=args.mode, rendezvous_port=args.rendezvous_port)
    final = task_command(settings, args.nproc_per_node, command)
    print(f"launch ({settings.mode}, task {os.environ.get('SLURM_PROCID')}): {shlex.join(final)}", file=sys.stderr)
    sys.stderr.flush()
    # exec, not a child: scancel's signals reach the training processes directly.
    os.execvp(final[0], final)


if __name__ == "__main__":
    main()
