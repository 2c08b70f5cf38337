"""Stop on SIGTERM/SIGINT at the next safe point; a second signal kills at once."""
from __future__ import annotations

import signal


class StopRequest:
    """Set by SIGTERM/SIGINT: finish the step, checkpoint, exit. A second signal kills."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
