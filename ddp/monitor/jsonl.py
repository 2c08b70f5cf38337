"""--log-jsonl: the run's record, one JSON object per line, appended as things happen
(start, a step at each log line, checkpoints, workers joining and leaving, the end)."""
from __future__ import annotations

import json
import time

import numpy as np

from ..errors import UsageError
from .state import finite


class JsonlRecord:
    """An open --log-jsonl file. A write that fails is one warning, and the record
    stops there: the run goes on.

    Parameters
    ----------
    path : str
        The file, appended to (UsageError if it cannot be opened).
    warn : callable
        Takes the one-line warning when a write fails.
    """

    def __init__(self, path: str, warn):
        self.path, self.warn = path, warn
        try:
            self.file = open(path, "a", buffering=1)
        except OSError as e:
            raise UsageError(f"--log-jsonl {path}: cannot write there ({e.strerror or e})")

    def write(self, kind: str, **fields) -> None:
        """One line: the time, `"event": kind`, then the fields (non-finite floats as null)."""
        if self.file is None:
            return
        record = {"time": round(time.time(), 6), "event": kind}
        record.update({k: finite(v) if isinstance(v, (float, np.floating)) else v
                       for k, v in fields.items()})
        try:
            self.file.write(json.dumps(record, default=str) + "\n")
        except (OSError, ValueError) as e:
            self.warn(f"--log-jsonl {self.path}: cannot write ({getattr(e, 'strerror', None) or e}); "
                      f"no more records")
            self.close()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
