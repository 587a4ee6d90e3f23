"""Distributed launch: rank and world size from torchrun's or SLURM's environment, and gathers.

torchrun (also inside a SLURM job) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
``srun`` with one task per GPU sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the rendezvous
host is then the first host of SLURM_JOB_NODELIST. With neither, training is one process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from regioncl.device import wants_cuda

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-02,07],cpu3' -> ['gpu01', 'gpu02', 'gpu07', 'cpu3'] (zero padding kept), like ``scontrol show hostnames``."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        hosts.extend(_expand_host(item))
    return hosts


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    expanded = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        numbers = range(int(low), int(high or low) + 1)
        expanded.extend(f"{head}{n:0{len(low)}d}{rest}" for n in numbers for rest in _expand_host(tail))
    return expanded


def read_dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1")
        # One port per job, so two jobs sharing a first node do not collide.
        port = int(environ.get("MASTER_PORT", DEFAULT_PORT + int(environ.get("SLURM_JOB_ID", 0)) % 20000))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR", expand_slurm_nodelist(nodelist)[0]),
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=DEFAULT_PORT, launcher="single")


def init_distributed(env: DistEnv, device: str = "auto") -> torch.device:
    """Join the process group (NCCL on GPU, gloo on CPU) when world_size > 1; return this rank's device."""
    use_cuda = wants_cuda(device)
    torch_device = torch.device(f"cuda:{env.local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
        )
    return torch_device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
