"""Training curves: per-step metrics as JSON lines, and their plots.

A metrics log holds one JSON record per optimizer step: ``step`` (steps done, 1-based),
``lr``, ``loss`` and the method's or detector's other loss terms; pretraining adds ``epoch``,
``momentum``, ``images_per_s`` and, where the method has one, ``chance_loss`` (the loss of a
model that learned nothing, e.g. ln(1 + queue) for InfoNCE). A job appends to the log in its
resumable work directory (a resume first drops the steps it will redo) and publishes it as a
workflow output when it finishes:

    results/metrics/pretrain/<run>.jsonl
    results/metrics/finetune/<run>/<benchmark>/seed<seed>.jsonl

``plot_curves`` draws loss and learning rate against step, the chance level dashed, as SVG.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from regioncl.io import atomic_path, write_text_atomic  # noqa: E402

# SVG: the report's landing page embeds them as text (workflow/report/workflow.rst).
PRETRAIN_PLOT = "pretrain_curves.svg"
MAX_POINTS = 2000  # per curve: a million-step ImageNet run still draws (and embeds) quickly


def finetune_plot(benchmark: str) -> str:
    return f"finetune_curves_{benchmark}.svg"


def truncate_after(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step``: the steps after it will be trained (and
    logged) again. A torn last line (a crash or full disk mid-append) is dropped with a warning;
    a bad line before it is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if record is None and number == len(lines):
            print(f"warning: {path}:{number}: dropping a torn last line {line[:80]!r}", file=sys.stderr)
            break
        if record is None:
            raise ValueError(f"{path}:{number}: expected one JSON record per line, got {line[:80]!r}")
        if record["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(kept))


class MetricsLog:
    """The per-step log of one job in its work directory, resumed at ``resume_step``."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)

    def append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(dict(record)) + "\n")

    def publish(self, out: Path) -> None:
        """Copy the log to the workflow output ``out`` (atomically: a reader never sees half)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            else:
                Path(tmp).write_text("")


def publish_detectron2_metrics(path: Path, out: Path) -> int:
    """detectron2's ``metrics.json`` (its JSONWriter: a record every 20 iterations, 0-based
    ``iteration``, ``total_loss``, ``lr``, ``loss_*``) as this module's records in ``out``; a
    resumed run's repeated iterations keep their last record. Returns the records written."""
    records: dict[int, dict[str, Any]] = {}
    for record in read_metrics(path) if Path(path).exists() else []:
        if "total_loss" in record:
            losses = {key: value for key, value in record.items() if key.startswith("loss_")}
            step = record["iteration"] + 1
            records[step] = {"step": step, "lr": record["lr"], "loss": record["total_loss"], **losses}
    lines = "".join(json.dumps(records[step]) + "\n" for step in sorted(records))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, lines)
    return len(records)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]


def _smoothed(values: np.ndarray) -> np.ndarray:
    """A running mean over 1/50 of the curve (at least 1 step), same length as ``values``."""
    window = max(1, len(values) // 50)
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def plot_curves(logs: Mapping[str, Path], out: Path, title: str) -> dict[str, dict[str, Any]]:
    """Loss (left, smoothed over the raw values, the chance level dashed) and lr (right)
    against step, one colour per log (``label -> path``). Returns what was drawn per label:
    ``{"steps": n, "final_loss": smoothed last value, "chance_loss": value or None}``."""
    figure, (loss_axes, lr_axes) = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn: dict[str, dict[str, Any]] = {}
    for index, (label, path) in enumerate(sorted(logs.items())):
        records = [record for record in read_metrics(path) if "loss" in record]
        if not records:
            continue
        colour = f"C{index % 10}"
        steps = np.array([record["step"] for record in records])
        loss = np.array([record["loss"] for record in records], dtype=float)
        lr = np.array([record["lr"] for record in records], dtype=float)
        smooth = _smoothed(loss)
        shown = np.unique(np.linspace(0, len(steps) - 1, MAX_POINTS).astype(int))
        loss_axes.plot(steps[shown], loss[shown], color=colour, alpha=0.25, linewidth=0.8)
        loss_axes.plot(steps[shown], smooth[shown], color=colour, label=label)
        chance = records[-1].get("chance_loss")
        if chance is not None:
            loss_axes.axhline(chance, color=colour, linestyle="--", linewidth=1)
        lr_axes.plot(steps[shown], lr[shown], color=colour, label=label)
        drawn[label] = {"steps": len(records), "final_loss": float(smooth[-1]), "chance_loss": chance}
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    if any(item["chance_loss"] is not None for item in drawn.values()):
        loss_axes.plot([], [], color="grey", linestyle="--", label="chance (learned nothing)")
    lr_axes.set_xlabel("step")
    lr_axes.set_ylabel("learning rate")
    figure.suptitle(title)
    figure.subplots_adjust(wspace=0.3)
    if drawn:
        loss_axes.legend(fontsize="small")
    else:
        loss_axes.text(0.5, 0.5, "no curves", ha="center", va="center", transform=loss_axes.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Text as text (not glyph paths) and ids salted by the title: several plots inline in one
    # page (the report's landing page) share no element ids.
    with atomic_path(out) as tmp, plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": title}):
        figure.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return drawn


def write_curve_plots(pretrain: Sequence[Path], finetune: Sequence[Path], out_dir: Path) -> list[Path]:
    """The pretraining runs' curves in one plot and the finetuning jobs' in one per benchmark.
    Labels come from the paths' layout (module docstring): the run, and run/seed."""
    written = [out_dir / PRETRAIN_PLOT]
    plot_curves({Path(path).stem: Path(path) for path in pretrain}, written[0], "pretraining")
    by_benchmark: dict[str, dict[str, Path]] = {}
    for path in map(Path, finetune):
        run, benchmark, seed = path.parts[-3], path.parts[-2], path.stem
        by_benchmark.setdefault(benchmark, {})[f"{run} {seed}"] = path
    for benchmark, logs in sorted(by_benchmark.items()):
        written.append(out_dir / finetune_plot(benchmark))
        plot_curves(logs, written[-1], f"finetuning on {benchmark}")
    return written
