"""Stop on SIGTERM/SIGINT at the next safe point; a second signal kills at once.

Before the training loop runs there is no safe point to wait for and nothing to
save: a signal then ends the process at once (`Interrupted`, exit 128+N), even
while it is blocked reading a file. Once the loop owns the parameters, `defer()`
turns a signal into a request the loop honours after the current step.
"""
from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """A signal before training started: nothing to save, exit 128 + `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Set by SIGTERM/SIGINT: finish the step, checkpoint, exit. A second signal kills."""

    def __init__(self):
        self.signum = 0
        self.deferred = False  # until defer(): a signal raises Interrupted where it lands
        self._previous = {}

    def install(self, deferred: bool = False) -> None:
        self.deferred = deferred
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def defer(self) -> None:
        """From now on a signal only sets `signum`; the loop checks it between steps."""
        self.deferred = True

    def _handle(self, signum, frame):
        if not self.deferred:
            raise Interrupted(signum)
        if self.signum:  # second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
