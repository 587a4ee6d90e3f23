"""Atomic writes: a killed writer leaves no file that looks complete, and its hidden leftover
is removed by the next writer of the same file."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from regioncl.io import (
    _temp_prefix,
    atomic_path,
    read_json,
    remove_stale_temporaries,
    write_text_atomic,
)

KILLED_WRITER = """
import os, signal, sys
from regioncl.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def hidden_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "shard.tar"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(dest)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert len(hidden_files(tmp_path)) == 1  # what SIGKILL leaves behind
    write_text_atomic(dest, "complete")
    assert dest.read_text() == "complete"
    assert hidden_files(tmp_path) == []


def test_a_live_writers_temporary_is_kept(tmp_path):
    dest = tmp_path / "out.json"
    live = tmp_path / f"{_temp_prefix(dest)}abc.tmp"  # this process: alive
    live.write_text("in progress")
    other = tmp_path / ".other.json.x.1.abc.tmp"  # another file's temporary
    other.write_text("x")
    assert remove_stale_temporaries(dest) == []
    assert live.exists() and other.exists()


def test_a_temporary_of_another_host_is_kept(tmp_path):
    dest = tmp_path / "out.json"
    remote = tmp_path / f".out.json.some-other-node.{os.getpid() + 10**6}.abc.tmp"
    remote.write_text("maybe alive there")
    assert remove_stale_temporaries(dest) == []
    assert remote.exists()


def test_a_failed_block_leaves_neither_the_file_nor_a_temporary(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_json_file_is_an_error_naming_the_file_line_and_column(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [\n  {"id": 1},\n  {"id": ')  # a download cut short
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON at line 3 column 10: Expecting value"):
        read_json(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text"):
        read_json(path)
    path.write_text('{"ok": [1, 2]}')
    assert read_json(path) == {"ok": [1, 2]}
