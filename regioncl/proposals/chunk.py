"""One proposal job: a chunk of the image list -> a parquet of filtered boxes + a JSON report.

Bad files (unreadable, truncated, not an image, too small or too large) are recorded in the
report and skipped; they never abort the chunk. Only a chunk with no good image at all fails.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from regioncl.data.proposals_file import write_proposals
from regioncl.data.sources import UnreadableImage, chunk_of, decode_rgb, read_image_list
from regioncl.io import write_json_atomic
from regioncl.progress import Progress
from regioncl.proposals.filters import (
    RULES,
    BoxFilterSettings,
    filter_boxes,
    random_boxes,
)
from regioncl.proposals.selective_search import (
    SelectiveSearchSettings,
    selective_search,
)
from regioncl.settings import Settings

PROPOSAL_MODES = ("selective_search", "random")
# Tasks in flight per worker process: enough to keep every worker busy while the main process
# consumes results in order, few enough that memory does not grow with the chunk.
_WINDOW_PER_PROCESS = 4

@dataclass(frozen=True)
class ProposalSettings(Settings):
    """Everything that decides a chunk's proposals (recorded in the parquet, report and shards).

    mode:             "selective_search", or "random" (SoCo's ablation: ``random_boxes``
                      boxes per image drawn to satisfy the filter, seeded by (seed, key)).
    selective_search: see ``SelectiveSearchSettings``.
    filter:           see ``BoxFilterSettings``.
    random_boxes:     boxes per image in random mode.
    seed:             seed of random mode.
    min_image_side:   images with a side below this many px are skipped as bad.
    max_image_pixels: images with more pixels are skipped as bad (decompression-bomb guard,
                      checked from the header before decoding).
    """

    section: ClassVar[str] = "proposals"

    mode: str = "selective_search"
    selective_search: SelectiveSearchSettings = field(default_factory=SelectiveSearchSettings)
    filter: BoxFilterSettings = field(default_factory=BoxFilterSettings)
    random_boxes: int = 100
    seed: int = 0
    min_image_side: int = 8
    max_image_pixels: int = 8000 * 8000

    def __post_init__(self) -> None:
        if self.mode not in PROPOSAL_MODES:
            raise ValueError(f"proposals.mode must be one of {', '.join(PROPOSAL_MODES)}, got {self.mode!r}")
        if self.random_boxes < 1:
            raise ValueError(f"proposals.random_boxes must be >= 1, got {self.random_boxes}")
        if self.min_image_side < 1 or self.max_image_pixels < self.min_image_side**2:
            raise ValueError(
                f"proposals.min_image_side must be >= 1 and max_image_pixels >= min_image_side**2, "
                f"got {self.min_image_side}, {self.max_image_pixels}"
            )



@dataclass(frozen=True)
class ImageProposals:
    key: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float64 x1y1x2y2 original px
    rule: str
    candidates: int  # proposals before filtering


@dataclass(frozen=True)
class BadImage:
    key: str
    path: str
    reason: str


@dataclass(frozen=True)
class ChunkReport:
    """What a chunk job did; written as the chunk's JSON report."""

    chunk: int
    num_chunks: int
    images: int
    good: int
    bad: int
    bad_files: list[dict[str, str]]  # [{key, path, reason}]
    rules: dict[str, int]  # good images per filter rule (filters.RULES)
    mean_proposals: float  # kept boxes per good image
    mean_candidates: float  # boxes per good image before filtering
    seconds: float
    images_per_second: float
    processes: int
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def propose_image(task: tuple[str, str, ProposalSettings]) -> ImageProposals | BadImage:
    """Proposals for one image ``(key, path, settings)``, or why the file was skipped."""
    key, path, settings = task
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return BadImage(key, path, f"cannot read: {err}")
    try:
        image, _ = decode_rgb(data, min_side=settings.min_image_side, max_pixels=settings.max_image_pixels)
    except UnreadableImage as err:
        return BadImage(key, path, str(err))
    width, height = image.size
    if settings.mode == "random":
        candidates = random_boxes(key, width, height, settings.random_boxes, settings.seed, settings.filter)
    else:
        candidates = selective_search(np.asarray(image), settings.selective_search)
    boxes, rule = filter_boxes(candidates, width, height, settings.filter)
    return ImageProposals(key, path, width, height, boxes, rule, len(candidates))


def _init_worker() -> None:
    # Parallelism comes from processes; OpenCV's own threads would oversubscribe the cores.
    cv2.setNumThreads(1)


@contextmanager
def _results(tasks: Sequence[tuple[str, str, ProposalSettings]], processes: int) -> Iterator[Iterator[Any]]:
    """Results of ``propose_image`` over ``tasks``, in task order; worker processes when processes > 1."""
    if processes == 1:
        _init_worker()  # this process is the worker
        yield map(propose_image, tasks)
        return
    # spawn: no inherited threads or locks from the parent (fork + OpenCV/torch threads can hang).
    # An executor rather than multiprocessing.Pool: if a worker dies (a crash in native code, the
    # OOM killer), Pool silently replaces it and waits forever for the lost task; the executor
    # raises BrokenProcessPool.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker) as pool:
        yield _in_order(pool, tasks, window=_WINDOW_PER_PROCESS * processes)


def _in_order(
    pool: ProcessPoolExecutor, tasks: Sequence[tuple[str, str, ProposalSettings]], window: int
) -> Iterator[ImageProposals | BadImage]:
    """``propose_image`` over ``tasks`` in task order, with at most ``window`` tasks submitted
    and not yet consumed (``Executor.map`` would submit the whole chunk up front and keep every
    future and result alive until its turn)."""
    pending: deque[Future[ImageProposals | BadImage]] = deque()
    for task in tasks:
        pending.append(pool.submit(propose_image, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def run_chunk(
    image_list: Path,
    chunk: int,
    num_chunks: int,
    out_parquet: Path,
    out_report: Path,
    settings: ProposalSettings,
    processes: int = 1,
) -> ChunkReport:
    """Compute proposals for chunk ``chunk`` of ``num_chunks`` of ``image_list`` (see
    ``sources.chunk_of``); write ``out_parquet`` (rows sorted by key) and ``out_report``."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    entries = chunk_of(read_image_list(image_list), chunk, num_chunks)
    tasks = [(key, str(path), settings) for key, path in entries]
    good: list[ImageProposals] = []
    bad: list[BadImage] = []
    start = time.perf_counter()
    with _results(tasks, processes) as results:
        progress = Progress(len(tasks), desc=f"proposals chunk {chunk} (images)")
        try:
            for result in results:
                (good if isinstance(result, ImageProposals) else bad).append(result)
                progress.update(len(good) + len(bad))
        except BrokenProcessPool as err:
            raise RuntimeError(
                f"proposals chunk {chunk} of {num_chunks}: a worker process died while segmenting "
                f"{tasks[len(good) + len(bad)][1]} or an image after it ({err})"
            ) from err
        finally:
            progress.close()
    seconds = time.perf_counter() - start
    if not good:
        reasons = "; ".join(f"{item.path}: {item.reason}" for item in bad[:5])
        raise RuntimeError(
            f"proposals chunk {chunk} of {num_chunks} ({image_list}): no good image among "
            f"{len(entries)} (first reasons: {reasons or 'the chunk is empty'})"
        )
    good.sort(key=lambda item: item.key)
    write_proposals(good, settings.to_dict(), out_parquet)
    rules = Counter(item.rule for item in good)
    report = ChunkReport(
        chunk=chunk,
        num_chunks=num_chunks,
        images=len(entries),
        good=len(good),
        bad=len(bad),
        bad_files=[dataclasses.asdict(item) for item in bad],
        rules={rule: rules.get(rule, 0) for rule in RULES},
        mean_proposals=float(np.mean([len(item.boxes) for item in good])),
        mean_candidates=float(np.mean([item.candidates for item in good])),
        seconds=seconds,
        images_per_second=len(entries) / seconds,
        processes=processes,
        settings=settings.to_dict(),
    )
    write_json_atomic(out_report, report.to_dict())
    return report


