#!/usr/bin/env python3
"""Set up the environment if needed, then run the default pipeline or the tests.

    python3 workflow/scripts/quickstart.py run    [extra snakemake arguments]
    python3 workflow/scripts/quickstart.py test   [extra pytest arguments]

The environment is `.venv/` beside the Snakefile, installed from the pinned `requirements.lock`
plus this package (editable). It is rebuilt only when the lock file or pyproject.toml changes,
or the checkout moves.
Only Python >= 3.11 and its standard library are needed to start.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
STAMP = VENV / ".regioncl-installed"
INSTALL_INPUTS = (ROOT / "requirements.lock", ROOT / "pyproject.toml")


def _fingerprint() -> str:
    # The checkout's path too: a .venv copied or linked from another clone holds an editable
    # install of that clone, and would run its code here; a new path re-points it.
    digest = hashlib.sha256(str(ROOT).encode())
    for path in INSTALL_INPUTS:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _bin(name: str) -> str:
    return str(VENV / "bin" / name)


def ensure_environment() -> None:
    if sys.version_info < (3, 11):
        raise SystemExit(f"regioncl needs Python >= 3.11, this is {sys.version.split()[0]}")
    fingerprint = _fingerprint()
    if STAMP.is_file() and STAMP.read_text() == fingerprint:
        return
    if not (VENV / "bin" / "python").exists():
        print(f"creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing pinned dependencies from requirements.lock (first time: a few minutes)", file=sys.stderr)
    pip = [_bin("python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-r", str(ROOT / "requirements.lock")], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(fingerprint)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test"):
        raise SystemExit(__doc__)
    command, extra = sys.argv[1], sys.argv[2:]
    ensure_environment()
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    if command == "run":
        argv = [_bin("snakemake"), "--profile", "workflow/profiles/local", *extra]
    else:
        argv = [_bin("python"), "-m", "pytest", *extra]
    os.chdir(ROOT)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    main()
