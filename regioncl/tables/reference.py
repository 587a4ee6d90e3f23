"""The numbers the papers report, as stored in `config/reference/<paper>.yaml`.

A reference file holds one paper's main tables, each copied from the paper's spec
(`shared/specs/spec_<paper>.md`, section 5) with its table number, caption, printed row names
and epochs, and one entry per value column naming the printed header and the benchmark and
metric it measures (e.g. `1× AP^bb` -> `coco_mask_rcnn_r50fpn_1x`, `bbox.AP`). Values are the
printed numbers in percent; a cell printed `-` (not reported) is `null`. Printed deltas in
brackets ("57.0 (+3.5)") are derived numbers and are not stored.

The spec's markdown tables are read by `parse_markdown_tables`, which the tests use to check
every reference file cell for cell against its spec.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from regioncl.settings import Settings


@dataclasses.dataclass(frozen=True)
class MarkdownTable:
    """One pipe table of a markdown file, with the `###` heading it sits under."""

    heading: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def parse_markdown_tables(text: str) -> list[MarkdownTable]:
    """Every pipe table in ``text`` (header line, `|---|` line, body lines), in order."""
    lines = text.splitlines()
    tables: list[MarkdownTable] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("### "):
            heading = line.removeprefix("### ").strip()
        is_table_start = line.startswith("|") and i + 1 < len(lines) and _is_separator(lines[i + 1])
        if not is_table_start:
            i += 1
            continue
        header = _split_row(line)
        body: list[tuple[str, ...]] = []
        i += 2
        while i < len(lines) and lines[i].strip().startswith("|"):
            body.append(_split_row(lines[i].strip()))
            i += 1
        tables.append(MarkdownTable(heading=heading, header=header, rows=tuple(body)))
    return tables


def _is_separator(line: str) -> bool:
    return re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()) is not None


def _split_row(line: str) -> tuple[str, ...]:
    # `\|` never occurs in the specs; a row is `| a | b |`.
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def spec_table(tables: list[MarkdownTable], number: int, part: int) -> MarkdownTable:
    """The ``part``-th pipe table under the heading `### Table <number>...`."""
    under = [t for t in tables if re.match(rf"Table {number}(?!\d)", t.heading)]
    if part >= len(under):
        raise ValueError(f"spec has {len(under)} table(s) under heading 'Table {number}'; expected part {part}")
    return under[part]


def printed_value(cell: str) -> float | None:
    """A printed number: bold, bracketed deltas and † marks dropped; `-` (not reported) -> None.

    "**43.2**" -> 43.2, "57.0 (+3.5)" -> 57.0, "25.8(-1.3)" -> 25.8, "39.8 (+0.4)†" -> 39.8.
    """
    text = cell.replace("**", "").replace("†", "").strip()
    text = re.sub(r"\s*\([^)]*\)$", "", text).strip()
    if text in ("-", "—", "−"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"table cell {cell!r}: expected a number or '-'") from None


def printed_label(cell: str) -> str:
    """A row label without markdown emphasis: "**SoCo**" -> "SoCo", "*Ours*" -> "Ours", "SoCo\\*" -> "SoCo*"."""
    text = cell.replace(r"\*", "\0").replace("**", "").strip()
    if len(text) > 1 and text.startswith("*") and text.endswith("*"):
        text = text[1:-1]
    return text.replace("\0", "*").strip()


def printed_epochs(cell: str) -> int | None:
    """An epoch cell: "200" -> 200, "-" (no pretraining) -> None."""
    text = printed_label(cell)
    return None if text in ("-", "") else int(text)


@dataclasses.dataclass(frozen=True)
class SpecSource(Settings):
    """Where a reference table is printed: spec file, `### Table <table>`, its pipe tables `parts`."""

    spec: str
    table: int
    parts: tuple[int, ...] = (0,)


@dataclasses.dataclass(frozen=True)
class ReferenceColumn(Settings):
    header: str  # as printed, e.g. "1× AP^bb"
    benchmark: str  # our benchmark name, e.g. "coco_mask_rcnn_r50fpn_1x"
    metric: str  # "<iou_type>.<name>" as in metrics.json, e.g. "bbox.AP"


@dataclasses.dataclass(frozen=True)
class ReferenceRow(Settings):
    method: str  # as printed, e.g. "MoCo v2 [5]"
    values: tuple[float | None, ...]  # one per column, percent; None = not reported
    epochs: int | None = None  # None: printed "-" or the table has no epoch column


@dataclasses.dataclass(frozen=True)
class ReferenceTable(Settings):
    paper: str
    caption: str
    source: SpecSource
    method_header: str  # the printed header of the row-label column
    columns: tuple[ReferenceColumn, ...]
    rows: tuple[ReferenceRow, ...]
    epochs_header: str | None = None  # the printed header of the epoch column, if any

    def row(self, method: str, epochs: int | None, where: str) -> ReferenceRow:
        """The row printed as ``method`` at ``epochs`` (any epochs where the paper prints none)."""
        named = [r for r in self.rows if r.method == method and r.epochs in (None, epochs)]
        if len(named) != 1:
            printed = sorted({f"{r.method} ({r.epochs} ep)" for r in self.rows})
            raise ValueError(f"{where}: no single reference row {method!r} at {epochs} epochs; rows: {printed}")
        return named[0]

    def value(self, row: ReferenceRow, benchmark: str, metric: str) -> float | None:
        for column, value in zip(self.columns, row.values, strict=True):
            if (column.benchmark, column.metric) == (benchmark, metric):
                return value
        return None


def load_reference_file(path: Path) -> dict[str, ReferenceTable]:
    """Tables of one reference file, keyed `<file stem>.<table id>` (e.g. `soco.table1`)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or set(data) != {"paper", "tables"}:
        raise ValueError(f"{path}: expected top-level keys ['paper', 'tables']")
    tables = {}
    for table_id, entry in data["tables"].items():
        where = f"{path}: tables.{table_id}"
        table = ReferenceTable.from_dict({"paper": data["paper"], **entry}, where)
        for i, row in enumerate(table.rows):
            if len(row.values) != len(table.columns):
                raise ValueError(
                    f"{where}.rows[{i}] ({row.method}): {len(row.values)} values, expected one per column "
                    f"({len(table.columns)})"
                )
        tables[f"{Path(path).stem}.{table_id}"] = table
    return tables


def load_references(directory: Path) -> dict[str, ReferenceTable]:
    """Every `*.yaml` reference file of ``directory``, merged."""
    tables: dict[str, ReferenceTable] = {}
    paths = sorted(Path(directory).glob("*.yaml"))
    if not paths:
        raise ValueError(f"{directory}: no reference files (*.yaml)")
    for path in paths:
        tables.update(load_reference_file(path))
    return tables
