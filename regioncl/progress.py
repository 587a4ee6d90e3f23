"""Progress of a loop: a tqdm bar on a terminal, plain periodic lines everywhere else.

A bar redraws itself with carriage returns, which in a log file (Snakemake's `tee`, a SLURM
output file) becomes one ever-growing line; so off a terminal the same calls print one short
line every ``every`` steps and at the last one, each ending in a newline.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """``update(step, **values)`` after each step (``step`` counts done steps, 1..total)."""

    def __init__(
        self, total: int, *, initial: int = 0, desc: str, every: int | None = None, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc = total, desc
        self.every = every or max(1, total // 20)
        self.terminal = self.stream.isatty()
        self.bar = tqdm(
            total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True, disable=not self.terminal
        )
        self.start, self.start_step = time.perf_counter(), initial

    def update(self, step: int, **values: Any) -> None:
        if self.terminal:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({name: _format(value) for name, value in values.items()}, refresh=False)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
            shown = " ".join(f"{name}={_format(value)}" for name, value in values.items())
            percent = 100 * step / max(self.total, 1)
            print(
                f"{self.desc}: {step}/{self.total} ({percent:.0f} %) {shown} [{elapsed:.0f} s, {rate:.3g} steps/s]",
                file=self.stream, flush=True,
            )  # fmt: skip

    def close(self) -> None:
        self.bar.close()
