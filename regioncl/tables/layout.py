"""What a paper table is: its rows (our runs), its column groups (metrics per benchmark) and
the reference table beside them, as read from a tables config (`config/tables/*.yaml`).

`paper` fills a `PaperTable` with numbers; `render` and `plots` draw it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from regioncl.baselines import BASELINES, baseline_run
from regioncl.settings import Settings


@dataclasses.dataclass(frozen=True)
class TableRow(Settings):
    method: str  # our method registry name, or a baseline (`random`, `supervised`)
    epochs: int | None = None  # pretraining epochs; None for `random`, ImageNet epochs for `supervised`
    reference: str | None = None  # the reference table's printed row name, e.g. "MoCo v2 [5]"
    # our run name; default `{method}_{arch}_{epochs}ep`, a baseline's `random` / `supervised_{arch}`
    run: str | None = None
    label: str | None = None  # shown row name; default: `reference`, else `method`
    # The row reads benchmark `<column's benchmark><suffix>`: the same protocol with another
    # transfer, e.g. ReSim-FPN's `_backbone` (the FPN not loaded) beside ReSim-FPN^T's default.
    benchmark_suffix: str = ""


@dataclasses.dataclass(frozen=True)
class ColumnGroup(Settings):
    benchmark: str  # our benchmark name, e.g. "coco_mask_rcnn_r50fpn_1x"
    metrics: tuple[str, ...]  # `<iou_type>.<name>`, e.g. ("bbox.AP", "segm.AP50")
    label: str = ""  # the group's header, e.g. "1×"; empty for a single group


@dataclasses.dataclass(frozen=True)
class PaperTable(Settings):
    caption: str
    columns: tuple[ColumnGroup, ...]
    rows: tuple[TableRow, ...]
    arch: str = "r50"  # short arch name in run names
    reference: str | None = None  # `<paper>.<table>` in config/reference
    # A row's method (e.g. `random`) that every other row is compared with: each cell then
    # also shows `(mean - the baseline's mean)`, the question a benchmark without a paper asks.
    baseline: str | None = None

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline not in [row.method for row in self.rows]:
            raise ValueError(
                f"baseline: {self.baseline!r} is not the method of any row ({[row.method for row in self.rows]})"
            )

    def run_of(self, row: TableRow) -> str:
        if row.run is not None:
            return row.run
        if row.method in BASELINES:
            return baseline_run(row.method, self.arch)
        return f"{row.method}_{self.arch}_{row.epochs}ep"

    @staticmethod
    def label_of(row: TableRow) -> str:
        return row.label or row.reference or row.method


def load_tables_config(path: Path) -> dict[str, PaperTable]:
    """`{tables: {id: PaperTable}}` from a tables config file."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or set(data) != {"tables"}:
        raise ValueError(f"{path}: expected one top-level key 'tables'")
    return {
        table_id: PaperTable.from_dict(entry, f"{path}: tables.{table_id}")
        for table_id, entry in data["tables"].items()
    }
