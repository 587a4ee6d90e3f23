"""The papers' transfer protocols as named benchmarks, read from ``config/benchmarks/*.yaml``.

One file per protocol (e.g. ``coco_mask_rcnn_r50_fpn.yaml``)::

    protocol: <the file's stem>
    extends: <another protocol>    # optional: start from its ``settings``
    layouts: [coco]                # dataset layouts it runs on (regioncl.data.layouts)
    seeds: [0, 1, 2, 3, 4]         # finetuning seeds the paper averages over
    sources: {topic: "spec_x §y"}  # where each number comes from
    settings: {...}                # BenchmarkSettings fields shared by the variants
    variants:                      # the named benchmarks: overrides of ``settings``
      coco_mrcnn_r50fpn_1x: {solver: {iterations: 90000, lr_steps: [60000, 80000]}}

A workflow config names one with ``benchmarks.<name>.protocol: <variant>``
(``resolve_benchmark``); the entry's other keys override it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from regioncl.data.layouts import SPLIT_PATHS, DatasetSpec
from regioncl.transfer.benchmarks import BenchmarkSettings

REGISTRY_DIR = Path(__file__).resolve().parents[2] / "config" / "benchmarks"
_FILE_KEYS = {"protocol", "extends", "layouts", "seeds", "sources", "settings", "variants"}
_REQUIRED_KEYS = ("protocol", "layouts", "seeds", "sources", "settings", "variants")
# Entry keys that describe where settings come from rather than being settings.
_NOT_SETTINGS = ("protocol", "dataset", "name", "dataset_name")


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, recursing into nested mappings (lists are replaced)."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


class RegistryError(ValueError):
    """A malformed protocol file, or a name the registry does not hold."""


@dataclass(frozen=True)
class RegisteredBenchmark:
    """One variant of a protocol: its ``BenchmarkSettings`` input minus the dataset."""

    name: str
    protocol: str
    path: Path
    layouts: tuple[str, ...]
    seeds: tuple[int, ...]
    sources: dict[str, str]
    settings: dict[str, Any]

    def settings_with(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The registered settings updated by a config entry's own keys (``protocol`` dropped)."""
        own = {k: v for k, v in overrides.items() if k not in _NOT_SETTINGS}
        return merged({**self.settings, "protocol": self.name}, own)

    def check_layout(self, layout: str, where: str) -> None:
        if layout not in self.layouts:
            raise RegistryError(
                f"{where}: benchmark {self.name!r} ({self.path}) runs on dataset layouts "
                f"{list(self.layouts)}, got a dataset with layout {layout!r}"
            )

    def resolve(self, root: Path, layout: str | None = None) -> BenchmarkSettings:
        """The typed settings on a dataset ``root`` of ``layout`` (default: its first layout);
        the root need not exist (only ``DatasetSpec.check`` looks at it)."""
        layout = layout or self.layouts[0]
        spec = DatasetSpec(name=layout, layout=layout, root=Path(root))
        entry = {"protocol": self.name}
        return BenchmarkSettings.from_dict(resolve_benchmark(self.name, entry, spec), self.name)


class Registry(Mapping[str, RegisteredBenchmark]):
    """Every registered benchmark by name, across the protocol files of one directory."""

    def __init__(self, benchmarks: dict[str, RegisteredBenchmark], directory: Path) -> None:
        self._benchmarks = benchmarks
        self.directory = directory

    def __getitem__(self, name: str) -> RegisteredBenchmark:
        return self._benchmarks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._benchmarks)

    def __len__(self) -> int:
        return len(self._benchmarks)

    def get(self, name: str, where: str = "benchmark") -> RegisteredBenchmark:  # type: ignore[override]
        if name not in self._benchmarks:
            raise RegistryError(
                f"{where}: {name!r} is not a registered benchmark in {self.directory}; "
                f"expected one of {sorted(self._benchmarks)}"
            )
        return self._benchmarks[name]


def _read_protocol(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a mapping of {sorted(_FILE_KEYS)}")
    unknown = sorted(set(data) - _FILE_KEYS)
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if unknown or missing:
        raise RegistryError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    if data["protocol"] != path.stem:
        raise RegistryError(f"{path}: protocol {data['protocol']!r} must equal the file name {path.stem!r}")
    for layout in data["layouts"]:
        if layout not in SPLIT_PATHS:
            raise RegistryError(f"{path}: layout {layout!r} has no detection splits; expected one of {sorted(SPLIT_PATHS)}")
    if not data["variants"]:
        raise RegistryError(f"{path}: variants: expected at least one named benchmark")
    return data


def _protocol_settings(name: str, files: dict[str, dict[str, Any]], chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A protocol's settings with those of the protocols it ``extends`` underneath."""
    if name in chain:
        raise RegistryError(f"extends: cycle {' -> '.join((*chain, name))}")
    if name not in files:
        raise RegistryError(f"extends: {chain[-1]!r} extends unknown protocol {name!r}; known: {sorted(files)}")
    data = files[name]
    base = _protocol_settings(data["extends"], files, (*chain, name)) if "extends" in data else {}
    return merged(base, data["settings"])


@functools.lru_cache(maxsize=4)
def load_registry(directory: Path = REGISTRY_DIR) -> Registry:
    """Read and validate every ``*.yaml`` protocol under ``directory`` (cached per directory)."""
    directory = Path(directory)
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise RegistryError(f"{directory}: no benchmark protocol files (*.yaml)")
    files = {path.stem: _read_protocol(path) for path in paths}
    benchmarks: dict[str, RegisteredBenchmark] = {}
    for path in paths:
        data = files[path.stem]
        settings = _protocol_settings(path.stem, files)
        for name, overrides in data["variants"].items():
            if name in benchmarks:
                raise RegistryError(f"{path}: benchmark {name!r} is also defined in {benchmarks[name].path}")
            benchmarks[name] = RegisteredBenchmark(
                name=name,
                protocol=path.stem,
                path=path,
                layouts=tuple(data["layouts"]),
                seeds=tuple(int(seed) for seed in data["seeds"]),
                sources=dict(data["sources"]),
                settings=merged(settings, overrides or {}),
            )
    return Registry(benchmarks, directory)


def resolve_benchmark(name: str, entry: dict[str, Any], dataset: DatasetSpec) -> dict[str, Any]:
    """The fully resolved ``BenchmarkSettings.from_dict`` input (defaults filled in) for a
    config entry (without its ``dataset`` key) on a configured dataset, whose layout supplies
    the split paths. An entry with ``protocol: <registry name>`` starts from that registered
    benchmark (``config/benchmarks/*.yaml``); its other keys override the registry's values."""
    if "protocol" in entry:
        registered = load_registry().get(entry["protocol"], f"benchmarks.{name}.protocol")
        registered.check_layout(dataset.layout, f"benchmarks.{name}.dataset")
        entry = registered.settings_with(entry)
    if dataset.layout not in SPLIT_PATHS:
        raise ValueError(
            f"benchmarks.{name}.dataset: {dataset.name!r} has layout {dataset.layout!r}, which "
            f"has no detection annotations; expected one of {sorted(SPLIT_PATHS)}"
        )
    paths = {"root": str(dataset.root), **SPLIT_PATHS[dataset.layout]}
    data = {**entry, "name": name, "dataset_name": dataset.name, "dataset": paths}
    return BenchmarkSettings.from_dict(data, f"benchmarks.{name}").to_dict()


def registered_seeds(resolved: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The finetuning seeds of the protocol a resolved benchmark came from (``None``: it names
    no protocol, so the workflow's ``finetune.seeds`` apply)."""
    protocol = resolved.get("protocol", "")
    return load_registry().get(protocol, f"benchmark {resolved.get('name')!r}").seeds if protocol else None
