"""Cluster resources of every rule, from the config's ``resources`` section.

    resources:
      default:  {runtime: 60, mem_mb: 8000, cpus: 1, partition: cpu, account: myproject}
      finetune: {runtime: 1440, mem_mb: 64000, cpus: 16, gpus: 8, partition: gpu}

An entry is named after a rule (``RULES``); ``default`` fills what a rule's entry leaves out.
``runtime`` is in minutes, ``mem_mb`` and ``gpus`` per node, ``cpus`` per SLURM task (the
rule's ``threads`` when unset, or ``default.cpus`` if larger). ``gpus`` is accepted on the
rules that use GPUs only (``GPU_RULES``), ``nodes`` on pretraining only: a key no rule would
read is an error, not a silent no-op.

``slurm`` gives the rule's resources in the SLURM executor plugin's names: ``runtime``,
``mem_mb``, ``cpus_per_task``, ``slurm_partition``, ``slurm_account``, and for GPUs
``gres=gpu:N`` per node with ``tasks_per_gpu=0`` (else the plugin starts one task per GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from regioncl.settings import Settings

# Every rule of the workflow, in pipeline order; each may have a `resources` entry.
RULES = (
    "embedded_dataset", "image_list", "proposals", "proposal_stats", "shards", "pretrain",
    "convert", "finetune", "evaluate", "probe", "tables", "paper_tables", "curves",
)  # fmt: skip
GPU_RULES = ("pretrain", "finetune", "evaluate")
MULTI_NODE_RULES = ("pretrain",)


@dataclass(frozen=True)
class StageResources(Settings):
    section: ClassVar[str] = "resources"

    runtime: int | None = None  # minutes
    mem_mb: int | None = None  # per node
    cpus: int | None = None  # per SLURM task
    gpus: int | None = None  # per node (GPU_RULES only)
    nodes: int | None = None  # MULTI_NODE_RULES only
    partition: str | None = None
    account: str | None = None


class ClusterResources:
    """The ``resources`` section, checked once; per-rule values with ``default`` filled in."""

    def __init__(self, section: Mapping[str, Any], threads: Mapping[str, int]) -> None:
        unknown = sorted(set(section) - {"default", *RULES})
        if unknown:
            raise ValueError(f"resources: {unknown} is not a rule; expected 'default' or some of {list(RULES)}")
        self._entries = {name: StageResources.from_dict(entry or {}, f"resources.{name}") for name, entry in section.items()}
        self._threads = dict(threads)
        for name, entry in self._entries.items():
            if entry.gpus is not None and name not in GPU_RULES:
                raise ValueError(f"resources.{name}.gpus: only {list(GPU_RULES)} use GPUs; set gpus there")
            if entry.nodes is not None and name not in MULTI_NODE_RULES:
                raise ValueError(f"resources.{name}.nodes: only {list(MULTI_NODE_RULES)} run on several nodes")
            for key in ("runtime", "mem_mb", "cpus", "nodes"):
                value = getattr(entry, key)
                if value is not None and value < 1:
                    raise ValueError(f"resources.{name}.{key}: expected an integer >= 1, got {value}")
            if entry.gpus is not None and entry.gpus < 0:
                raise ValueError(f"resources.{name}.gpus: expected an integer >= 0, got {entry.gpus}")
        for rule in RULES:
            cpus, threads = self.value(rule, "cpus"), self.threads(rule)
            if rule in self._entries and self._entries[rule].cpus is not None and cpus < threads:
                raise ValueError(
                    f"resources.{rule}.cpus: {cpus} CPUs for a rule that runs {threads} threads "
                    f"(its stage's threads/processes setting); expected >= {threads}"
                )

    def value(self, rule: str, key: str) -> Any:
        """The rule's own value of ``key``, else ``default``'s (GPUs and nodes: the rule's only)."""
        if rule not in RULES:
            raise KeyError(f"resources: no rule {rule!r}; rules are {list(RULES)}")
        own = getattr(self._entries.get(rule, StageResources()), key)
        if own is not None or key in ("gpus", "nodes"):
            return own
        default = getattr(self._entries.get("default", StageResources()), key)
        if key == "cpus":
            return max(default or 1, self.threads(rule))
        return default

    def threads(self, rule: str) -> int:
        return self._threads.get(rule, 1)

    def gpus(self, rule: str) -> int:
        return self.value(rule, "gpus") or 0

    def nodes(self, rule: str) -> int:
        return self.value(rule, "nodes") or 1

    def cpus(self, rule: str) -> int:
        return self.value(rule, "cpus")

    def slurm(self, rule: str, gpus_of_job: Callable[[Any], int] | None = None) -> dict[str, Any]:
        """The rule's Snakemake resources. ``gpus_of_job``: the GPUs per node of one job, a
        function of its wildcards, where a job may use fewer than the configured count (a
        one-GPU backend); called only when the rule has GPUs."""
        resources: dict[str, Any] = {
            "runtime": self.value(rule, "runtime"),
            "mem_mb": self.value(rule, "mem_mb"),
            "cpus_per_task": self.cpus(rule),
            "slurm_partition": self.value(rule, "partition"),
            "slurm_account": self.value(rule, "account"),
        }
        if self.gpus(rule) > 0:
            resources["gres"] = f"gpu:{self.gpus(rule)}"
            if gpus_of_job is not None:
                resources["gres"] = lambda wildcards: f"gpu:{gpus_of_job(wildcards)}"
            resources["tasks_per_gpu"] = 0
        return {key: value for key, value in resources.items() if value is not None}
