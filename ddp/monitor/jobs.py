"""The recorded state of the training service: its jobs table as the service last set
it, its worker pool, how long jobs queued and ran, and the RunStates of the jobs it
tracks (those running and the last MAX_FINISHED finished). Written by the service's
thread, read by the HTTP thread under one lock; every view is built from it when read.
"""
from __future__ import annotations

import math
import numbers
import threading
from collections import Counter, deque

from .state import Histogram, RunState, finite

JOB_STATES = ("queued", "running", "done", "failed", "diverged", "cancelled")
MAX_FINISHED = 5            # finished jobs whose metrics, status and history stay served
# seconds in a queue or running: from a second to a week
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
               14400.0, 28800.0, 86400.0, 172800.0, 604800.0, math.inf)


def _plain(value):
    """A row's value as JSON can hold it: a non-finite or numpy float as a float or None."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return finite(value)
    return value


class TrackedJob:
    """A job whose run the service records: its id, name and RunState."""

    __slots__ = ("job_id", "name", "run")

    def __init__(self, job_id: str, name: str, run: RunState):
        self.job_id, self.name, self.run = job_id, name, run


class ServiceState:
    """What the service shows: the jobs table, the pool, the queue and run-time
    histograms and the tracked jobs. The service writes, the views read copies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[dict] = []
        self.pool_workers = self.idle_workers = 0
        self.queue, self.duration = Histogram(JOB_BUCKETS), Histogram(JOB_BUCKETS)
        self.tracked: dict[str, TrackedJob] = {}     # in the order they were added
        self.finished: deque[str] = deque()          # tracked ids that finished, oldest first

    # --- written by the service --------------------------------------------------------

    def track(self, job: TrackedJob) -> None:
        with self.lock:
            if job.job_id in self.finished:          # the same id again: a new run of it
                self.finished.remove(job.job_id)
            self.tracked.pop(job.job_id, None)
            self.tracked[job.job_id] = job

    def finish(self, job_id: str) -> None:
        """The job's run is over: it stays tracked until MAX_FINISHED newer ones finished."""
        with self.lock:
            if job_id not in self.tracked or job_id in self.finished:
                return
            self.finished.append(job_id)
            while len(self.finished) > MAX_FINISHED:
                del self.tracked[self.finished.popleft()]

    def observe(self, histogram: Histogram, seconds: float) -> None:
        with self.lock:
            histogram.observe(seconds)

    def set_rows(self, rows: list[dict]) -> None:
        copied = [{k: _plain(v) for k, v in row.items()} for row in rows]
        with self.lock:
            self.rows = copied

    def set_pool(self, workers: int, idle: int) -> None:
        with self.lock:
            self.pool_workers, self.idle_workers = workers, idle

    # --- read by the views -------------------------------------------------------------

    def _by_state(self) -> dict[str, int]:
        counts = Counter(row.get("state") for row in self.rows)
        return {state: counts[state] for state in JOB_STATES}

    def snapshot(self) -> dict:
        """Copies of everything, taken under the lock in one go."""
        with self.lock:
            return {"rows": list(self.rows), "by_state": self._by_state(),
                    "pool_workers": self.pool_workers, "idle_workers": self.idle_workers,
                    "queue": self.queue.cumulative(), "duration": self.duration.cumulative(),
                    "tracked": [(j.job_id, j.run) for j in self.tracked.values()],
                    "unfinished": [(j.job_id, j.run) for j in self.tracked.values()
                                   if j.job_id not in self.finished]}

    def job(self, job_id: str) -> tuple[dict | None, TrackedJob | None]:
        """(its row, its tracked record) for the id; (None, None) for an unknown one."""
        with self.lock:
            row = next((r for r in self.rows if r.get("id") == job_id), None)
            return row, self.tracked.get(job_id)
