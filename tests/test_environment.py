"""The install files agree: pyproject ranges, the pinned lock, and the cluster conda env."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normalized(name)] = version
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return [Requirement(spec) for spec in specs]


def test_lock_pins_every_declared_dependency_within_its_range():
    lock = _lock()
    for requirement in _declared():
        pinned = lock.get(_normalized(requirement.name))
        assert pinned is not None, f"{requirement.name} is missing from requirements.lock"
        assert requirement.specifier.contains(pinned), f"{requirement.name}=={pinned} violates {requirement}"


def test_lock_never_takes_the_cpu_only_torch_213_wheel():
    # Versions, not strings: as strings "2.9" >= "2.14" holds and "2.100" < "2.14".
    assert Version(_lock()["torch"]) >= Version("2.14")


def test_conda_env_pins_match_the_lock():
    env = yaml.safe_load((ROOT / "envs" / "regioncl.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    conda_pins = dict(line.split("==") for line in pip_section)
    lock = _lock()
    declared = {_normalized(r.name) for r in _declared()}
    assert {_normalized(name) for name in conda_pins} == declared
    for name, version in conda_pins.items():
        assert lock[_normalized(name)] == version, f"envs/regioncl.yaml pins {name}=={version}, lock has {lock[_normalized(name)]}"
    assert "python=3.11" in env["dependencies"]


def test_the_tests_import_this_checkouts_package():
    """An editable install of another clone (a .venv copied or linked between checkouts) would
    make every test here check that clone's code; quickstart.py re-points it (its stamp holds the
    checkout's path), and this says so if it did not."""
    import regioncl

    assert Path(regioncl.__file__).resolve().is_relative_to(ROOT / "regioncl"), (
        f"regioncl is imported from {regioncl.__file__}, not from this checkout {ROOT}: "
        "run `python3 workflow/scripts/quickstart.py test` here to re-install it"
    )
