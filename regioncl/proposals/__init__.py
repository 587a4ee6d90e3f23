"""Object proposals computed offline: selective search, SoCo's box filter, chunked jobs."""

from __future__ import annotations

from regioncl.data.proposals_file import read_proposals
from regioncl.proposals.chunk import (
    ChunkReport,
    ProposalSettings,
    run_chunk,
)
from regioncl.proposals.filters import BoxFilterSettings, filter_boxes
from regioncl.proposals.selective_search import (
    SelectiveSearchSettings,
    selective_search,
)
from regioncl.proposals.stats import proposal_stats

__all__ = [
    "BoxFilterSettings",
    "ChunkReport",
    "ProposalSettings",
    "SelectiveSearchSettings",
    "filter_boxes",
    "proposal_stats",
    "read_proposals",
    "run_chunk",
    "selective_search",
]
