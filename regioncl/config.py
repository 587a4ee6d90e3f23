"""The workflow's configuration, resolved once into a plan that the Snakemake rules read.

The JSON schema (workflow/schemas/config.schema.yaml) checks the shape of the YAML; this
module checks what a schema cannot: that every named method and benchmark is implemented,
that dataset roots have their layouts, and that each stage's settings parse into that
stage's typed settings. Every problem is raised before any job runs, naming the key.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regioncl.archs import ARCH_SHORT_NAMES
from regioncl.baselines import BASELINES, SUPERVISED, baseline_run
from regioncl.data.layouts import SPLIT_PATHS, DatasetSpec
from regioncl.resources import ClusterResources

if TYPE_CHECKING:
    from regioncl.convert import SupervisedSource

EMBEDDED_OUTPUTS = ("dataset.json", SPLIT_PATHS["embedded"]["train_json"], SPLIT_PATHS["embedded"]["val_json"])


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


# Every name a baseline or its run may take: no pretraining run may take one.
BASELINE_RUNS = frozenset(BASELINES) | {baseline_run(b, short) for b in BASELINES for short in ARCH_SHORT_NAMES.values()}


@dataclass(frozen=True)
class RunSpec:
    """One pretraining run: a method, an architecture and a schedule on a dataset."""

    name: str
    method: str
    arch: str
    epochs: int
    dataset: str
    settings: dict[str, Any]  # PretrainSettings.from_dict input, fully resolved
    # The only benchmarks it is finetuned on (None: every selected benchmark of its arch), e.g.
    # a COCO-pretrained run that feeds one table of a paper.
    benchmarks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FinetuneJob:
    run: str
    benchmark: str
    seed: int

    @property
    def directory(self) -> str:
        return f"results/finetune/{self.run}/{self.benchmark}/seed{self.seed}"


def use_package_from(source_root: str) -> None:
    """Put ``source_root`` first on PYTHONPATH for every job this process starts."""
    current = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([source_root, current] if current else [source_root])


def run_name(method: str, arch: str, epochs: int, dataset: str | None = None) -> str:
    """``{method}_{arch}_{epochs}ep``, and ``_{dataset}`` for a run on another dataset than
    ``pretrain_data.dataset`` (``dataset=None``): run names are the identities of results, so
    the default dataset's runs keep their names as datasets are added."""
    if arch not in ARCH_SHORT_NAMES:
        raise ConfigError(f"pretrain.runs: arch {arch!r} is not one of {sorted(ARCH_SHORT_NAMES)}")
    return f"{method}_{ARCH_SHORT_NAMES[arch]}_{epochs}ep" + (f"_{dataset}" if dataset else "")


def merged_config_files(overlays: list[Path], base: Path = Path("config/config.yaml")) -> dict[str, Any]:
    """``base`` with each YAML file of ``overlays`` merged over it in order, as Snakemake merges
    ``--configfile``s (mappings key by key, lists replaced): the config the scripts under
    benchmarks/ resolve a plan from."""
    import yaml

    from regioncl.transfer.registry import merged

    config: dict[str, Any] = {}
    for path in [base, *overlays]:
        config = merged(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


class WorkflowPlan:
    """Everything the rules need, derived from the validated config dict."""

    def __init__(self, config: dict[str, Any], *, check_datasets: bool = True) -> None:
        self.datasets = {
            name: DatasetSpec(name=name, layout=entry["layout"], root=Path(entry["root"]))
            for name, entry in config["datasets"].items()
        }
        self.embedded_settings: dict[str, Any] = dict(config.get("embedded", {}))
        embedded = [spec for spec in self.datasets.values() if spec.layout == "embedded"]
        self.embedded_root = str(embedded[0].root) if embedded else "results/data/embedded"

        data = config["pretrain_data"]
        self.pretrain_dataset = self._known_dataset(data["dataset"], "pretrain_data.dataset")
        self._chunks_per_dataset = isinstance(data["chunks"], dict)
        self._num_chunks = self._resolve_chunks(data["chunks"])

        proposals = config["proposals"]
        self.proposal_processes = int(proposals.get("processes", 1))
        self.proposal_settings: dict[str, Any] = dict(proposals.get("settings", {}))

        finetune = config["finetune"]
        self.baselines: list[str] = self._known_baselines(finetune.get("baselines", []))
        self.supervised_sources = self._resolve_supervised_sources(finetune.get("supervised", {}))
        self.supervised_runs: dict[str, SupervisedSource] = {}  # filled with the jobs that finetune them

        pretrain = config["pretrain"]
        self.pretrain_nproc_per_node = int(pretrain.get("nproc_per_node", 1))
        self.pretrain_threads = int(pretrain.get("threads", max(1, self.pretrain_nproc_per_node)))
        self.runs = self._resolve_runs(pretrain, config.get("methods", {}), set(config.get("benchmarks", {})))

        self.finetune_threads = int(finetune.get("threads", 1))
        self.finetune_workers: int | None = finetune.get("num_workers")
        self.benchmarks = self._resolve_benchmarks(config.get("benchmarks", {}), finetune["benchmarks"])
        self.jobs = self._finetune_jobs(finetune)

        threads = {"proposals": self.proposal_processes, "pretrain": self.pretrain_threads}
        threads |= {"finetune": self.finetune_threads, "evaluate": self.finetune_threads}
        try:
            self.cluster = ClusterResources(config.get("resources", {}), threads)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self._validate_stage_settings()
        if finetune.get("check_backends", True):
            self._check_backends_installed()
        if check_datasets:
            for name in self._datasets_in_use():
                self.datasets[name].check()

    # -- resolution -------------------------------------------------------------------------

    def _known_dataset(self, name: str, key: str) -> str:
        if name not in self.datasets:
            raise ConfigError(f"{key}: dataset {name!r} is not defined under `datasets` ({sorted(self.datasets)})")
        return name

    def _resolve_chunks(self, chunks: int | dict[str, int]) -> dict[str, int]:
        """``pretrain_data.chunks``: the proposal and shard jobs of each pretraining dataset. A
        count chunks the default dataset only; ``{dataset: count}`` names every chunked dataset,
        the default among them."""
        from regioncl.data.sources import EXPECTED_LAYOUT

        if self._chunks_per_dataset:
            counts = {name: int(count) for name, count in chunks.items()}
        else:
            counts = {self.pretrain_dataset: int(chunks)}
        if self.pretrain_dataset not in counts:
            raise ConfigError(
                f"pretrain_data.dataset: {self.pretrain_dataset!r} has no count under pretrain_data.chunks "
                f"({sorted(counts)}); the default dataset is chunked too"
            )
        for name in counts:
            layout = self.datasets[self._known_dataset(name, self._chunks_key(name))].layout
            # A benchmark-only layout (voc, cityscapes, lvis) has no image lister: fail now, not at its job.
            if layout not in EXPECTED_LAYOUT:
                raise ConfigError(
                    f"{self._chunks_key(name)}: dataset {name!r} has layout {layout!r}, which cannot be listed "
                    f"for pretraining; expected one of {list(EXPECTED_LAYOUT)}"
                )
        return counts

    def _chunks_key(self, dataset: str) -> str:
        return f"pretrain_data.chunks.{dataset}" if self._chunks_per_dataset else "pretrain_data.chunks"

    def _resolve_runs(
        self, pretrain: dict[str, Any], methods: dict[str, Any], benchmarks: set[str]
    ) -> dict[str, RunSpec]:
        from regioncl.methods import available_methods

        implemented = available_methods()
        unknown = sorted(set(methods) - set(implemented))
        if unknown:
            raise ConfigError(f"methods: {unknown} is not a registered method; registered: {implemented}")
        defaults = dict(pretrain.get("defaults", {}))
        runs: dict[str, RunSpec] = {}
        for index, entry in enumerate(pretrain.get("runs", [])):
            key = f"pretrain.runs[{index}]"
            method = entry["method"]
            if method not in implemented:
                raise ConfigError(
                    f"{key}.method: method {method!r} is not implemented; implemented: {sorted(implemented)}"
                )
            # What the run is trained on and finetuned on is the plan's; the rest is the engine's.
            settings = {**defaults, **{k: v for k, v in entry.items() if k not in ("name", "dataset", "benchmarks")}}
            settings["method_params"] = {**methods.get(method, {}), **entry.get("method_params", {})}
            arch = settings.get("arch", "resnet50")
            epochs = int(settings["epochs"])
            dataset = self._known_dataset(entry.get("dataset", self.pretrain_dataset), f"{key}.dataset")
            if dataset not in self._num_chunks:
                raise ConfigError(
                    f"{key}.dataset: {dataset!r} is not chunked for pretraining; add it to pretrain_data.chunks "
                    f"(chunked: {sorted(self._num_chunks)})"
                )
            other_dataset = None if dataset == self.pretrain_dataset else dataset
            name = entry.get("name") or run_name(method, arch, epochs, other_dataset)
            if name in runs:
                raise ConfigError(f"{key}: run name {name!r} is used twice")
            if name in BASELINE_RUNS:
                raise ConfigError(f"{key}: run name {name!r} is a baseline's; choose another `name`")
            only = entry.get("benchmarks")
            unknown = sorted(set(only or ()) - benchmarks)
            if unknown:
                raise ConfigError(
                    f"{key}.benchmarks: {unknown} is not defined under `benchmarks` ({sorted(benchmarks)})"
                )
            runs[name] = RunSpec(
                name=name, method=method, arch=arch, epochs=epochs, dataset=dataset, settings=settings,
                benchmarks=None if only is None else tuple(only),
            )
        return runs

    @staticmethod
    def _known_baselines(baselines: list[str]) -> list[str]:
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"finetune.baselines: {unknown} not implemented; implemented: {list(BASELINES)}")
        return list(dict.fromkeys(baselines))

    @staticmethod
    def _resolve_supervised_sources(supervised: dict[str, Any]) -> dict[str, SupervisedSource]:
        """``finetune.supervised.weights``: per arch, where the ``supervised`` baseline's ImageNet
        weights come from (``regioncl.convert.SupervisedSource``); checked whether or not the
        baseline is finetuned, so a typo or a missing file shows now."""
        from regioncl.convert import SupervisedSource

        sources = {}
        for arch, value in supervised.get("weights", {}).items():
            try:
                sources[arch] = SupervisedSource.parse(value, arch)
            except ValueError as error:
                raise ConfigError(f"finetune.supervised.weights.{arch}: {error}") from error
        return sources

    def _baseline_run(self, method: str, benchmark: str) -> str:
        """The run of baseline ``method`` finetuned on ``benchmark``: ``supervised`` needs weights of its arch."""
        arch = self.benchmarks[benchmark]["arch"]
        run = baseline_run(method, ARCH_SHORT_NAMES[arch])
        if method == SUPERVISED:
            if arch not in self.supervised_sources:
                raise ConfigError(
                    f"finetune.supervised.weights: no {arch} weights for the supervised baseline, which "
                    f"benchmark {benchmark!r} finetunes; set finetune.supervised.weights.{arch} to `torchvision` "
                    "(torchvision's ImageNet weights, downloaded when converted) or the path of a torchvision "
                    f"classification state dict (.pth), or leave supervised out of benchmarks.{benchmark}.methods"
                )
            self.supervised_runs[run] = self.supervised_sources[arch]
        return run

    def _resolve_benchmarks(self, defined: dict[str, Any], selected: list[str]) -> dict[str, dict[str, Any]]:
        from regioncl.transfer.registry import resolve_benchmark

        resolved = {}
        # A benchmark's `methods`: the only methods (and baselines) finetuned on it, e.g. a
        # backbone-only variant that differs from its protocol only for methods that transfer an FPN.
        self._benchmark_methods: dict[str, list[str] | None] = {}
        for name in selected:
            if name not in defined:
                raise ConfigError(
                    f"finetune.benchmarks: benchmark {name!r} is not defined under `benchmarks` ({sorted(defined)})"
                )
            entry = dict(defined[name])
            dataset = self._known_dataset(entry.pop("dataset"), f"benchmarks.{name}.dataset")
            self._benchmark_methods[name] = self._known_methods(entry.pop("methods", None), f"benchmarks.{name}.methods")
            try:
                resolved[name] = resolve_benchmark(name, entry, self.datasets[dataset])
            except (TypeError, ValueError) as error:  # messages start with benchmarks.<name>.<key>
                raise ConfigError(str(error)) from error
        return resolved

    def _known_methods(self, methods: list[str] | None, key: str) -> list[str] | None:
        from regioncl.methods import available_methods

        known = available_methods() + self.baselines
        unknown = [m for m in methods or [] if m not in known]
        if unknown:
            raise ConfigError(f"{key}: {unknown} is not a registered method or baseline; known: {known}")
        return methods

    def _finetune_jobs(self, finetune: dict[str, Any]) -> list[FinetuneJob]:
        from regioncl.transfer.registry import registered_seeds

        jobs = []
        for benchmark, settings in self.benchmarks.items():
            allowed = self._benchmark_methods[benchmark]
            baselines = [b for b in self.baselines if allowed is None or b in allowed]
            runs = [self._baseline_run(b, benchmark) for b in baselines]
            runs += [
                r.name for r in self.runs.values()
                if r.arch == settings["arch"] and (allowed is None or r.method in allowed)
                and (r.benchmarks is None or benchmark in r.benchmarks)
            ]
            # A registered protocol fixes its seeds (VOC: 5 runs, as the papers average);
            # otherwise the workflow's `finetune.seeds`.
            seeds = registered_seeds(settings) or finetune.get("seeds", [0])
            for run in runs:
                for seed in seeds:
                    jobs.append(FinetuneJob(run=run, benchmark=benchmark, seed=int(seed)))
        return jobs

    def _validate_stage_settings(self) -> None:
        """Parse each stage's settings into its typed settings now, so errors come before jobs."""
        from regioncl.data.embedded import EmbeddedSettings
        from regioncl.engine import PretrainSettings
        from regioncl.proposals import ProposalSettings
        from regioncl.transfer.benchmarks import BenchmarkSettings

        checks = [("embedded", EmbeddedSettings, self.embedded_settings)]
        checks.append(("proposals.settings", ProposalSettings, self.proposal_settings))
        checks += [(f"pretrain run {r.name}", PretrainSettings, r.settings) for r in self.runs.values()]
        checks += [(f"benchmarks.{n}", BenchmarkSettings, s) for n, s in self.benchmarks.items()]
        for key, settings_type, values in checks:
            try:
                settings_type.from_dict(values)
            except (ValueError, TypeError, KeyError) as error:
                raise ConfigError(f"{key}: {error}") from error
        self._check_runs_fit_their_data()

    def _check_runs_fit_their_data(self) -> None:
        """What one stage's settings cannot see alone: a queue holds a global batch of keys, and
        batches and chunks fit the images (where the image count is known before any job)."""
        from regioncl.engine import PretrainSettings

        for dataset, chunks in self._num_chunks.items():
            images = self._image_count(dataset)
            if images is not None and chunks > images:
                raise ConfigError(
                    f"{self._chunks_key(dataset)}: {chunks} chunks of the {images} images of {dataset!r}; "
                    f"expected <= {images}"
                )
        for run in self.runs.values():
            settings = PretrainSettings.from_dict(run.settings)
            queue = getattr(settings.method_params, "queue_size", None)  # methods with a key queue
            if queue is not None and queue < settings.batch_size:
                raise ConfigError(
                    f"pretrain run {run.name}: method_params.queue_size: {queue} cannot hold the "
                    f"{settings.batch_size} keys of a global batch; expected >= batch_size ({settings.batch_size})"
                )
            images = self._image_count(run.dataset)
            if images is not None and settings.batch_size > images:
                raise ConfigError(
                    f"pretrain run {run.name}: batch_size: {settings.batch_size} exceeds the {images} images "
                    f"of {run.dataset!r}; expected <= {images}"
                )

    def _check_backends_installed(self) -> None:
        """A benchmark whose backend is not installed fails now, not after days of pretraining."""
        from regioncl.transfer.backends import missing_backends

        missing = missing_backends({name: settings["backend"] for name, settings in self.benchmarks.items()})
        if missing:
            raise ConfigError("finetune.benchmarks: " + "; ".join(missing) + (
                ". Or set finetune.check_backends: false to plan anyway (e.g. a dry run on a login "
                "node whose GPU nodes have it); those jobs then fail when they run"
            ))

    def _image_count(self, dataset: str) -> int | None:
        """Images a dataset will list, where known before listing it (the embedded set's)."""
        if self.datasets[dataset].layout != "embedded":
            return None
        from regioncl.data.embedded import EmbeddedSettings

        return EmbeddedSettings.from_dict(self.embedded_settings).n_unlabeled

    def _datasets_in_use(self) -> set[str]:
        used = set(self._num_chunks)  # the workflow's targets include every chunked dataset's shards
        used |= {r.dataset for r in self.runs.values()}
        used |= {settings["dataset_name"] for settings in self.benchmarks.values()}
        return used

    # -- lookups used by the rules -----------------------------------------------------------

    def dataset(self, name: str) -> DatasetSpec:
        return self.datasets[name]

    def run(self, name: str) -> RunSpec:
        return self.runs[name]

    def benchmark(self, name: str) -> dict[str, Any]:
        return self.benchmarks[name]

    def num_chunks(self, dataset: str) -> int:
        return self._num_chunks[dataset]

    def chunks(self, dataset: str) -> list[str]:
        return [f"{i:05d}" for i in range(self._num_chunks[dataset])]

    def embedded_outputs(self) -> list[str]:
        return [f"{self.embedded_root}/{rel}" for rel in EMBEDDED_OUTPUTS]

    def dataset_inputs(self, name: str) -> list[str]:
        """Files a dataset needs before it can be listed: the generator's for the embedded set."""
        return self.embedded_outputs() if self.datasets[name].layout == "embedded" else []

    def benchmark_inputs(self, name: str) -> list[str]:
        return self.dataset_inputs(self.benchmarks[name]["dataset_name"])

    def proposal_files(self, dataset: str, suffix: str) -> list[str]:
        return [f"results/proposals/{dataset}/{chunk}{suffix}" for chunk in self.chunks(dataset)]

    def shards_of(self, dataset: str) -> list[str]:
        return [f"results/shards/{dataset}/{chunk}.tar" for chunk in self.chunks(dataset)]

    def pretrain_data_products(self) -> list[str]:
        """Shards and proposal statistics of every chunked pretraining dataset (products users
        keep, so workflow targets, whether or not a run reads them yet)."""
        return [
            path for dataset in self._num_chunks
            for path in [*self.shards_of(dataset), f"results/proposals/{dataset}/stats.json"]
        ]

    def weights_inputs(self, run: str, benchmark: str) -> list[str]:
        """The converted weights a finetune loads: the format of the benchmark's backend (none
        for the ``random`` baseline)."""
        if run in self.baselines:
            return []
        from regioncl.transfer.backends import WEIGHTS_SUFFIX

        return [f"results/weights/{run}{WEIGHTS_SUFFIX[self.benchmarks[benchmark]['backend']]}"]

    def weights_arg(self, run: str, benchmark: str) -> str:
        return (self.weights_inputs(run, benchmark) or ["none"])[0]

    def converted_weights(self) -> list[str]:
        runs = [*self.runs, *self.supervised_runs]
        return [f"results/weights/{run}.{suffix}" for run in runs for suffix in ("tv.pth", "d2.pkl")]

    def convert_inputs(self, run: str) -> list[str]:
        """What ``convert`` reads for ``run``: its pretrained checkpoint, or a supervised run's
        local weights file (none for torchvision's, downloaded by the job)."""
        if run in self.supervised_runs:
            path = self.supervised_runs[run].path
            return [str(path)] if path is not None else []
        return [f"results/pretrain/{run}/checkpoint_final.pt"]

    def convert_source_args(self, run: str) -> str:
        """Shell words naming ``convert``'s source: ``--checkpoint CKPT``, or ``--supervised SOURCE
        --arch ARCH`` for a supervised run."""
        if run in self.supervised_runs:
            source = self.supervised_runs[run]
            return shlex.join(["--supervised", str(source), "--arch", source.arch])
        return shlex.join(["--checkpoint", *self.convert_inputs(run)])

    def method_of(self, run: str) -> str:
        if run in self.baselines:
            return run
        return SUPERVISED if run in self.supervised_runs else self.runs[run].method

    def metrics_files(self) -> list[str]:
        return [f"{job.directory}/metrics.json" for job in self.jobs]

    def rule_resources(self, rule: str) -> dict[str, Any]:
        """A rule's Snakemake resources (regioncl.resources): every rule's come from here. A
        benchmark on the one-GPU torchvision backend gets one GPU of the rule's count."""

        def gpus_of_job(wildcards: Any) -> int:
            return self.job_gpus(rule, wildcards.benchmark)

        return self.cluster.slurm(rule, gpus_of_job if rule in ("finetune", "evaluate") else None)

    def job_gpus(self, rule: str, benchmark: str) -> int:
        """GPUs of one finetune or evaluate job: the rule's, at most 1 for a torchvision benchmark."""
        gpus = self.cluster.gpus(rule)
        return gpus if self.benchmarks[benchmark]["backend"] == "detectron2" else min(gpus, 1)

    def launch_args(self, rule: str, benchmark: str) -> str:
        """Shell words of a job's launch options: a detectron2 job's GPU count (torchvision uses
        the GPU it sees: its benchmark's ``device: auto``) and, for finetuning, the configured
        ``finetune.num_workers``."""
        words = []
        if self.benchmarks[benchmark]["backend"] == "detectron2":
            words += ["--num-gpus", str(self.job_gpus(rule, benchmark))]
        if rule == "finetune" and self.finetune_workers is not None:
            words += ["--num-workers", str(self.finetune_workers)]
        return shlex.join(words)

    @staticmethod
    def quoted(settings: dict[str, Any]) -> str:
        """Settings as one shell-quoted JSON argument (also what Snakemake's params trigger on)."""
        return shlex.quote(json.dumps(settings, sort_keys=True))
