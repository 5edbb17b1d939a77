"""Training logs: CSV files (always), TensorBoard (when installed) and progress on the terminal.

Only rank 0 of a distributed run creates these (the loop passes ``enabled=False`` elsewhere).
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

__all__ = ["CsvLog", "Progress", "TensorBoard"]


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.7g}" if math.isfinite(value) else str(value)
    return value


class CsvLog:
    """Rows appended to a CSV file; the columns are those of the first row (later rows: extra
    keys are added as new columns by rewriting the file once, missing ones are left empty).

    Args:
        path: the file. An existing file is continued: with ``keep_until`` only its rows with
            ``step <= keep_until`` are kept (a resumed run rewinds to its checkpoint).
    """

    def __init__(self, path: str | Path, keep_until: int | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if self.path.is_file() and keep_until is not None:
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if _step(r) <= keep_until]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()

    def write(self, row: Mapping[str, Any]) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, self.columns, restval="").writerow(row)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, self.columns, restval="")
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)


def _step(row: Mapping[str, Any]) -> int:
    try:
        return int(float(row.get("step", 0)))
    except (TypeError, ValueError):
        return 0


class TensorBoard:
    """Scalars to TensorBoard event files when ``enabled`` and the package is importable;
    otherwise a one-line notice on ``stream`` and nothing else."""

    def __init__(self, log_dir: str | Path, enabled: bool, stream: TextIO | None = None) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("medreg train: tensorboard is not installed; logging to CSV only "
                  "(pip install tensorboard)", file=stream or sys.stderr, flush=True)
            return
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar with the loss and ETA on a terminal; otherwise one line every ``every`` steps.

    Args:
        total: the last step; start: the first step (resumed runs).
        every: steps between lines (no bar).
        quiet: report nothing.
        stream: where to write (default stderr).
        bar: force the bar on/off (default: when ``stream`` is a terminal).
    """

    def __init__(self, total: int, start: int = 0, every: int = 10, quiet: bool = False,
                 stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.total, self.start, self.every, self.quiet = int(total), int(start), int(every), quiet
        self.stream = stream or sys.stderr
        use_bar = (hasattr(self.stream, "isatty") and self.stream.isatty()) if bar is None else bar
        self._t0 = time.perf_counter()
        self._tqdm = None
        if not quiet and use_bar:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, initial=self.start, file=self.stream,
                              desc="train", dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float, extra: str = "") -> None:
        """Step ``step`` (1-based, done) finished with ``loss``."""
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.update(1)
            self._tqdm.set_postfix_str(f"loss {loss:.5g}" + (f" {extra}" if extra else ""),
                                       refresh=False)
            return
        if step % self.every and step != self.total:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self.total - step)
        print(f"step {step}/{self.total} loss {loss:.5g}" + (f" {extra}" if extra else "")
              + f" ({elapsed:.0f} s, ETA {eta:.0f} s)", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._tqdm is not None:
            self._tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
