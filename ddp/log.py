"""Rank 0 speaks: log lines, warnings and the progress bar go to stderr from rank 0 only.

Every line starts with the local time in ISO 8601 (milliseconds, UTC offset), so
that an operator can line a log up with the metrics:

    2026-12-01T22:13:05.123+00:00 step 200/1000 epoch 20 loss 0.4123 ...
"""
from __future__ import annotations

import sys
from datetime import datetime

LEVELS = ("info", "warning", "error")  # what a Log shows at least: everything, ..., errors only


def timestamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def stamped(msg: str) -> str:
    """`msg` behind the current time; the lines after its first are its continuation."""
    return f"{timestamp()} {msg}"


class Log:
    """Log lines at `level` or above, from rank 0 only, written around the progress bar."""

    def __init__(self, rank: int = 0, prog: str = "ddp-train", stream=None, level: str = "info"):
        assert level in LEVELS, level
        self.rank, self.prog = rank, prog
        self.level = LEVELS.index(level)
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None

    @property
    def speaks(self) -> bool:
        return self.rank == 0

    @property
    def quiet(self) -> bool:
        return self.level > 0

    def info(self, msg: str) -> None:
        if self.speaks and self.level == 0:
            self._write(msg)

    def warn(self, msg: str) -> None:
        if self.speaks and self.level <= 1:
            self._write(f"{self.prog}: warning: {msg}")

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(stamped(msg), file=self.stream)
        else:
            print(stamped(msg), file=self.stream, flush=True)

    # --- progress bar (tqdm, rank 0, only when asked or on a terminal) -----

    def start_progress(self, mode: str, total: int, initial: int) -> None:
        if not self.speaks:
            return
        on_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        if self.quiet:
            return
        if mode == "always" or (mode == "auto" and on_terminal):
            from tqdm.auto import tqdm  # a notebook's widget where tqdm supports it

            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    @property
    def has_bar(self) -> bool:
        return self.bar is not None

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def human_bytes(n: float | None, missing: str = "n/a") -> str:
    """1234567 -> '1.2 MB' (decimal units); `missing` for None."""
    if n is None:
        return missing
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
