"""Atomic file writing: a killed job never leaves a file that looks complete.

Every writer in regioncl writes to a temporary name in the destination's directory and
renames it into place (``os.replace`` is atomic on POSIX within one filesystem). ``read_json``
is the reading side's counterpart for JSON inputs: a broken file is an error naming it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def _host_prefix(dest: Path) -> str:
    return f".{dest.name}.{socket.gethostname()}."


def _temp_prefix(dest: Path) -> str:
    """``.<name>.<host>.<pid>.``: whose temporary file it is, so a later writer can tell a
    killed writer's leftover from a live one's (a shared filesystem spans several hosts)."""
    return f"{_host_prefix(dest)}{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Delete the temporary files of ``dest`` left by killed writers on this host (SIGKILL
    skips ``atomic_path``'s clean-up); return them. Other hosts' files are left alone."""
    host_prefix = _host_prefix(dest)
    removed = []
    for leftover in dest.parent.glob(f"{glob.escape(host_prefix)}*.tmp"):
        pid = leftover.name[len(host_prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds.

    Leftovers of earlier writers of ``dest`` that were killed (their process is gone) are
    removed first, so a re-run after SIGKILL leaves no hidden temporary files behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates mode 0600; give the final file the mode a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def write_json_atomic(dest: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file whole; a malformed or truncated one raises ValueError naming the file,
    line and column (json's own message names no file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text, so not JSON ({error})") from error
