"""What the training service shows on its one port: a Monitor per job (the same as a
one-job run's, fed the same way), the jobs table, the worker pool, how long jobs queued
and ran; served as /metrics, /status, /api/history, /healthz and the dashboard."""
from __future__ import annotations

from ..errors import require
from . import prometheus
from .jobs import ServiceState, TrackedJob
from .monitor import Monitor
from .server import MonitorServer
from .views import ServiceViews


class ServiceMonitor:
    """The service's observable state and its HTTP thread. The service's thread feeds
    it; the HTTP thread reads copies.

    Parameters
    ----------
    addr, port : str, int
        Where to serve (port 0: any free one; `port` is the one it got). OSError if it
        cannot bind; MissingPackageError without prometheus_client.
    stall_timeout : float
        Seconds a running job may go without a step before /healthz answers 503.
    warn : callable
        Takes one-line warnings (a job's record that cannot be written).
    """

    def __init__(self, addr: str, port: int, *, stall_timeout: float = 60.0, warn=print):
        require("prometheus_client", "--metrics-port")
        self.stall_timeout, self.warn = stall_timeout, warn
        self.state = ServiceState()
        views = ServiceViews(self.state, prometheus.service_registry(self.state), stall_timeout)
        # nobody waits for a last poll: the service outlives its jobs, and when it stops
        # its jobs' final states were served long before
        self.server = MonitorServer(views, addr, port, linger=0)
        self.port = self.server.port

    def add_job(self, job_id: str, *, name: str, total_steps: int, layers, parameters: int,
                lr: float, classify: bool, jsonl: str | None) -> Monitor:
        """A Monitor for the job's run, served under `job_id` from now on.

        Parameters
        ----------
        job_id, name : str
            The job's id (its metrics' job label, the ?job= of /status and /api/history)
            and its name.
        total_steps, layers, parameters, lr, classify
            What the run is, as for Monitor.
        jsonl : str or None
            The job's --log-jsonl record (UsageError if it cannot be opened).

        Returns
        -------
        Monitor
            With no server of its own; feed it as a one-job run's, then close() it and
            call job_finished.
        """
        monitor = Monitor(backend="zmq", total_steps=total_steps, layers=layers,
                          parameters=parameters, lr=lr, classify=classify,
                          stall_timeout=self.stall_timeout, jsonl=jsonl, warn=self.warn)
        self.state.track(TrackedJob(job_id, name, monitor.run))
        return monitor

    def job_finished(self, job_id: str) -> None:
        """The job's Monitor is closed. Its metrics, status and history stay served until
        MAX_FINISHED jobs finished after it, so that the label set stays bounded."""
        self.state.finish(job_id)

    def observe_queue(self, seconds: float) -> None:
        """A job left the queue (started or cancelled) after `seconds` in it."""
        self.state.observe(self.state.queue, seconds)

    def observe_duration(self, seconds: float) -> None:
        """A job ran for `seconds`, whatever its end."""
        self.state.observe(self.state.duration, seconds)

    def set_jobs(self, rows: list[dict]) -> None:
        """The jobs table, replaced whole (copied: the caller may change its rows after).

        Each row: ``{"id", "name", "state", "priority", "step", "total_steps", "loss",
        "accuracy", "eta_seconds", "workers", "submitted", "started", "ended",
        "exit_code", "message"}``; state is one of jobs.JOB_STATES; non-finite floats
        are served as null.
        """
        self.state.set_rows(rows)

    def set_pool(self, workers: int, idle: int) -> None:
        """Workers connected to the service, and how many of them run no job."""
        self.state.set_pool(workers, idle)

    def close(self) -> None:
        """Stop serving (the jobs' Monitors are their callers' to close)."""
        self.server.close()
