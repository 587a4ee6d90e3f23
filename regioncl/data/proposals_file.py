"""The proposals chunk file: a parquet of one row per good image, ``key, path, width, height,
boxes, rule`` (boxes: a flat list, 4 per box, x1 y1 x2 y2 in the original image's pixels; rule:
the filter rule that kept them), with ``{format, settings}`` in the parquet metadata
(docs/architecture.md). The proposals stage writes it, the proposal stats and the shards read it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from regioncl.io import atomic_path

PROPOSALS_FORMAT = "regioncl.proposals/1"
# Parquet schema metadata key holding {"format", "settings"}: a chunk file says how it was made.
METADATA_KEY = b"regioncl"

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.float64())),  # 4 per box: x1, y1, x2, y2 in original px
        ("rule", pa.string()),  # which filter rule produced the boxes (filters.RULES)
    ]
)


class ProposalRow(Protocol):
    key: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) x1y1x2y2 in original px
    rule: str


def write_proposals(rows: Sequence[ProposalRow], settings: dict[str, Any], out: Path) -> None:
    """Write a chunk's rows and the ``settings`` that made them (recorded in the footer)."""
    # Boxes go to Arrow straight from numpy (offsets + one flat array), not through Python floats.
    offsets = np.concatenate([[0], np.cumsum([row.boxes.size for row in rows])]).astype(np.int32)
    coordinates = np.concatenate([row.boxes.reshape(-1) for row in rows]).astype(np.float64)
    table = pa.Table.from_pydict(
        {
            "key": [row.key for row in rows],
            "path": [row.path for row in rows],
            "width": [row.width for row in rows],
            "height": [row.height for row in rows],
            "boxes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(coordinates)),
            "rule": [row.rule for row in rows],
        },
        schema=PARQUET_SCHEMA,
    )
    metadata = {"format": PROPOSALS_FORMAT, "settings": settings}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def read_proposal_settings(path: Path) -> dict[str, Any]:
    """The settings that made a chunk parquet, after checking (from its footer only) that it is one."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format") != PROPOSALS_FORMAT or schema.remove_metadata() != PARQUET_SCHEMA:
        raise ValueError(
            f"{path}: not a regioncl proposals file (expected format {PROPOSALS_FORMAT!r} with columns "
            f"{', '.join(PARQUET_SCHEMA.names)}); re-run the proposals stage"
        )
    return metadata["settings"]


def read_proposals(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of a chunk parquet (``boxes`` as (K, 4) float64 arrays) and the settings that made it."""
    settings = read_proposal_settings(path)
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["boxes"] = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)
    return rows, settings
