"""Rank 0 speaks: log lines, warnings and the progress bar go to stderr from rank 0 only."""
from __future__ import annotations

import sys


class Log:
    def __init__(self, rank: int = 0, prog: str = "ddp-train", stream=None, quiet: bool = False):
        self.rank, self.prog, self.quiet = rank, prog, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None

    @property
    def speaks(self) -> bool:
        return self.rank == 0

    def info(self, msg: str) -> None:
        if self.speaks and not self.quiet:
            self._write(msg)

    def warn(self, msg: str) -> None:
        if self.speaks:
            self._write(f"{self.prog}: warning: {msg}")

    def _write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    # --- progress bar (tqdm, rank 0, only when asked or on a terminal) -----

    def start_progress(self, mode: str, total: int, initial: int) -> None:
        if not self.speaks:
            return
        on_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        if mode == "always" or (mode == "auto" and on_terminal):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def advance(self, postfix: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)

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
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
