"""`regioncl doctor`: what this machine can run — torch and CUDA, GPUs, detectron2, SLURM.

Each check is one line ``name: state``; the report ends with what follows for the pipeline
(the CPU default, GPU training, detectron2 benchmarks, SLURM submission). Nothing here
changes the machine; a missing piece is reported, not raised.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_checks() -> list[Check]:
    import torch

    built = torch.version.cuda
    checks = [Check("torch", True, f"{torch.__version__} ({'CUDA ' + built if built else 'CPU-only build'})")]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
        capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        checks.append(Check("GPUs", True, f"{gpus} x {', '.join(names)} (compute capability {capability})"))
    else:
        why = "torch is a CPU-only build" if built is None else "CUDA build, but no device visible"
        checks.append(Check("GPUs", False, f"none ({why})"))
    checks.append(Check("torchvision", _version("torchvision") is not None, _version("torchvision") or "not installed"))
    return checks


def detectron2_check() -> Check:
    """Installed, and its compiled ops load (a build without them imports but cannot train)."""
    if importlib.util.find_spec("detectron2") is None:
        from regioncl.transfer.backends import BACKENDS

        return Check("detectron2", False, f"not installed; {BACKENDS['detectron2'].install}")
    try:
        import detectron2
        from detectron2 import _C  # the compiled ops
    except ImportError as error:
        return Check("detectron2", False, f"installed but its compiled ops do not load ({error}); rebuild it")
    # _C.has_cuda(): built with FORCE_CUDA=1 or on a machine with a GPU (docs/transfer.md)
    cuda_ops = "with CUDA ops" if _C.has_cuda() else "CPU ops only: rebuild with FORCE_CUDA=1 for GPUs"
    return Check("detectron2", True, f"{detectron2.__version__} ({cuda_ops})")


def slurm_check() -> Check:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return Check("SLURM", False, "sbatch not on PATH (run locally: --profile workflow/profiles/local)")
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return Check("SLURM", False, f"sbatch at {sbatch}, but sinfo did not answer ({error})")
    if result.returncode != 0:
        return Check("SLURM", False, f"sbatch at {sbatch}, but sinfo failed: {result.stderr.strip()[:200]}")
    partitions = sorted({line.split()[0] for line in result.stdout.splitlines() if line.strip()})
    plugin = _version("snakemake-executor-plugin-slurm") or "not installed"
    return Check("SLURM", True, f"partitions {partitions}; snakemake-executor-plugin-slurm {plugin}")


def run_checks() -> list[Check]:
    return [*torch_checks(), detectron2_check(), slurm_check()]


def verdicts(checks: list[Check]) -> list[str]:
    state = {check.name: check.ok for check in checks}
    yes = {True: "yes", False: "no"}
    return [
        f"the CPU default (config/config.yaml): {yes[state['torch'] and state['torchvision']]}",
        f"GPU pretraining and finetuning here: {yes[state['GPUs']]}",
        f"detectron2 benchmarks: {yes[state['detectron2']]}",
        f"submitting to SLURM (--profile workflow/profiles/slurm): {yes[state['SLURM']]}",
    ]


def report() -> str:
    checks = run_checks()
    lines = [f"{'ok ' if check.ok else '-- '} {check.name}: {check.detail}" for check in checks]
    lines += [f"CPUs: {os.cpu_count()}", "", "This machine can run:"]
    lines += [f"  {line}" for line in verdicts(checks)]
    return "\n".join(lines)
