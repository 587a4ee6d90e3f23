"""Object proposals computed offline: selective search, SoCo's box filter, chunked jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def check_settings_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    """Reject keys a settings dataclass does not have, naming the key and the allowed ones."""
    allowed = [field.name for field in dataclasses.fields(cls)]
    for key in data:
        if key not in allowed:
            raise ValueError(f"{where}: unknown setting {key!r}; expected one of {', '.join(allowed)}")


# Imported after ``check_settings_keys`` is defined: the submodules import it from here.
from regioncl.proposals.chunk import ChunkReport, ProposalSettings, read_proposals, run_chunk  # noqa: E402
from regioncl.proposals.filters import BoxFilterSettings, filter_boxes  # noqa: E402
from regioncl.proposals.selective_search import SelectiveSearchSettings, selective_search  # noqa: E402

__all__ = [
    "BoxFilterSettings",
    "ChunkReport",
    "ProposalSettings",
    "SelectiveSearchSettings",
    "check_settings_keys",
    "filter_boxes",
    "read_proposals",
    "run_chunk",
    "selective_search",
]
