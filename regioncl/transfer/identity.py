"""What a finetune's resumable checkpoints must share with the run that resumes them.

A finetune keeps its checkpoints in ``workdir/<key>``, where the key hashes the resolved
benchmark settings (less those a backend can resume across), the seed and the sha256 of the
weights file's bytes. A changed setting, or other weights under the same path, gives another
key: the re-run starts afresh beside the old checkpoints instead of resuming them and writing
the old model again (as pretraining's ``run_identity`` does for its workdir).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from regioncl.transfer.benchmarks import BenchmarkSettings

KEY_LENGTH = 12  # hex digits of the identity's sha256 in the directory name


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def without_keys(settings: dict[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    """``settings`` less the nested keys named ``section.key`` in ``dotted``."""
    pruned = json.loads(json.dumps(settings))
    for name in dotted:
        *sections, last = name.split(".")
        level = pruned
        for section in sections:
            level = level.get(section, {})
        level.pop(last, None)
    return pruned


def finetune_identity(
    benchmark: BenchmarkSettings, seed: int, weights: Path | None, may_change: Iterable[str] = ()
) -> dict[str, Any]:
    """The identity a checkpoint records: benchmark, seed, weights path and content hash, the
    settings hash (without the ``may_change`` keys) and ``key``, the hash of all that but the path."""
    settings = json.dumps(without_keys(benchmark.to_dict(), may_change), sort_keys=True)
    identity = {
        "benchmark": benchmark.name,
        "seed": seed,
        "weights_sha256": file_sha256(weights) if weights is not None else "none",
        "settings_sha256": hashlib.sha256(settings.encode()).hexdigest(),
    }
    # The path is recorded but not hashed: the same weights moved elsewhere still resume.
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]
    return {**identity, "weights": str(weights or "none"), "key": key}
