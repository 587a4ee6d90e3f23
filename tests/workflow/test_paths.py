"""Dataset roots reach the rules' shell commands quoted: a root named like a command
substitution runs nothing, and one with spaces and quotes is listed like any other."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import yaml
from conftest import ROOT, TINY_CONFIG, snakemake
from PIL import Image

INJECTING_ROOT = "x$(touch PWNED)y"  # relative to the workdir, where jobs run
ODD_NAME = "my \"photo's\" $(touch PWNED) dir"
# `{name}` or `{name.attr}` of a rule's shell command, with its format spec.
PLACEHOLDER = re.compile(r"\{((?:input|output|log|params|wildcards|threads)(?:\.\w+)?)(:\w+)?\}")
ALREADY_SHELL_WORDS = {"params.settings", "params.launch", "params.source"}  # PLAN.quoted, shlex.join


def odd_roots_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config overlay: the embedded set under INJECTING_ROOT, a folder dataset under ODD_NAME."""
    photos = tmp_path / ODD_NAME
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b c.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(photos / name)
    overlay = tmp_path / "odd_roots.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "datasets": {
                    "embedded": {"layout": "embedded", "root": INJECTING_ROOT},
                    "photos": {"layout": "folder", "root": str(photos)},
                }
            }
        )
    )
    return overlay, photos


def test_every_value_in_a_rule_shell_command_is_quoted():
    unquoted = [
        f"{path.name}: {{{name}}}"
        for path in sorted((ROOT / "workflow" / "rules").glob("*.smk"))
        for name, spec in PLACEHOLDER.findall(path.read_text())
        if spec != ":q" and name not in ALREADY_SHELL_WORDS
    ]
    assert unquoted == []


def test_odd_dataset_roots_run_nothing_and_are_listed(tmp_path):
    overlay, photos = odd_roots_config(tmp_path)
    workdir = tmp_path / "work"
    targets = ["results/lists/embedded.tsv", "results/lists/photos.tsv"]
    snakemake(workdir, *targets, "--cores", "1", "--configfile", str(TINY_CONFIG), str(overlay))
    assert not list(tmp_path.rglob("PWNED"))
    listed = (workdir / "results/lists/photos.tsv").read_text().splitlines()
    assert listed == [f"a\t{photos / 'a.jpg'}", f"b_c\t{photos / 'b c.jpg'}"]
    embedded = (workdir / "results/lists/embedded.tsv").read_text().splitlines()
    assert len(embedded) == 24 and all(f"\t{INJECTING_ROOT}/unlabeled/" in line for line in embedded)


def test_odd_roots_reach_the_finetune_settings_as_one_shell_word(tmp_path):
    overlay, _ = odd_roots_config(tmp_path)
    result = snakemake(tmp_path / "work", "-n", "-p", "--configfile", str(TINY_CONFIG), str(overlay))
    finetunes = [line for line in result.stdout.splitlines() if "regioncl.cli finetune" in line]
    assert finetunes
    for line in finetunes:
        words = shlex.split(line)
        settings = json.loads(words[words.index("--settings") + 1])
        assert settings["dataset"]["root"] == INJECTING_ROOT
