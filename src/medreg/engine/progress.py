"""Progress reporting for the driver: a bar on a terminal, one line per level otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Reports stage, level, iteration and loss.

    Args:
        quiet: report nothing.
        stream: where to write (default stderr).
        bar: force a tqdm bar (default: only when ``stream`` is a terminal); without a bar, one
            line is written when each level ends.
    """

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = (hasattr(self.stream, "isatty") and self.stream.isatty()) if bar is None else bar
        self._tqdm = None
        self._label = ""
        self._t0 = 0.0
        self._it = 0

    def start(self, stage: int, nstages: int, kind: str, level: int, nlevels: int, factor: int,
              iterations: int) -> None:
        self._label = f"stage {stage + 1}/{nstages} {kind:<12s} level {level + 1}/{nlevels} (1/{factor})"
        self._t0 = time.perf_counter()
        self._it = 0
        if self.quiet or not self.bar:
            return
        from tqdm import tqdm

        self._tqdm = tqdm(total=iterations, desc=self._label, file=self.stream, leave=True,
                          dynamic_ncols=True)

    def update(self, iteration: int, loss: float) -> None:
        self._it = iteration
        if self._tqdm is not None:
            self._tqdm.update(1)
            self._tqdm.set_postfix_str(f"loss {loss:.5g}", refresh=False)

    def end(self, loss: float) -> None:
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        else:
            dt = time.perf_counter() - self._t0
            print(f"{self._label}: {self._it} iterations, loss {loss:.5g}, {dt:.1f} s",
                  file=self.stream, flush=True)
