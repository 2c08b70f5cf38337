"""The views the HTTP server answers with: /healthz, /status and /api/history, each
built from the recorded state when asked for; those of one run (a RunState), and those
of the training service (its jobs, each job's run)."""
from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, parse_qsl

from .. import __version__
from .jobs import ServiceState
from .state import RUNNING, RunState, finite

MAX_FIELDS = 8              # query parameters a request may carry
SHOWN_CHARS = 60            # of a refused value, quoted back in the error line


def stalled(run: RunState, stall_timeout: float) -> str | None:
    """Why the run is stalled (a running run that completed no step for longer than
    `stall_timeout` seconds), or None."""
    with run.lock:
        state, step, idle = run.state, run.step, time.monotonic() - run.last_progress
    if state in RUNNING and idle > stall_timeout:
        return (f"no step completed for {idle:.0f} s (bound {stall_timeout:g} s, "
                f"--stall-timeout) at step {step}")
    return None


def health(run: RunState, stall_timeout: float) -> tuple[bool, str]:
    """(healthy, one line): unhealthy when the run is stalled."""
    why = stalled(run, stall_timeout)
    if why is not None:
        return False, f"stalled: {why}"
    with run.lock:
        return True, f"ok: {run.state} at step {run.step}/{run.total_steps}"


def worker_list(run: RunState, now: float) -> list[dict]:
    return [{"name": w.name, "last_step": w.last_step, "state": w.state,
             "seconds_since_report": round(now - w.reported, 3),
             "compute_seconds": finite(w.compute_seconds)} for w in run.workers.listing()]


def status(run: RunState) -> dict:
    """/status: where the run is, its last losses, its workers, its last checkpoint."""
    now = time.monotonic()
    workers = worker_list(run, now)
    with run.lock:
        return {
            "state": run.state, "backend": run.backend, "version": __version__,
            "step": run.step, "total_steps": run.total_steps, "epoch": run.epoch,
            "loss": finite(run.train_loss), "accuracy": finite(run.train_accuracy),
            "val_loss": finite(run.val_loss), "val_accuracy": finite(run.val_accuracy),
            "samples_per_second": finite(run.samples_per_second), "workers": run.workers.count,
            "worker_list": workers,
            "last_checkpoint_step": run.checkpoint_step, "last_checkpoint_time": run.checkpoint_time,
            "seconds_since_step": round(now - run.last_progress, 3) if run.totals.steps else None,
            "started": run.started, "layers": run.layers, "parameters": run.parameters,
        }


def history(run: RunState, after: int) -> dict:
    """/api/history?after=SEQ: the run's state and the points numbered above `after`."""
    with run.lock:
        points = run.history.since(after)
        return {"seq": points["seq"], "state": run.state, "train": points["train"],
                "val": points["val"]}


class QueryError(Exception):
    """A request the views refuse: the HTTP status `code` and one line saying why."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _shown(value: str) -> str:
    """A value from a request, quoted on one line and cut short."""
    return repr(value[:SHOWN_CHARS]) + ("…" if len(value) > SHOWN_CHARS else "")


class RunViews:
    """The views of one run, as a one-job run's port serves them.

    Parameters
    ----------
    run : RunState
        What the views show.
    registry : prometheus_client.CollectorRegistry
        What /metrics encodes.
    stall_timeout : float
        Seconds without a step after which /healthz answers 503.
    """

    def __init__(self, run: RunState, registry, stall_timeout: float):
        self.run, self.registry, self.stall_timeout = run, registry, stall_timeout

    def health(self) -> tuple[bool, str]:
        return health(self.run, self.stall_timeout)

    def status(self, query: str) -> dict:
        return status(self.run)

    def history(self, query: str) -> dict:
        try:
            after = int(parse_qs(query).get("after", ["0"])[0])
        except ValueError:
            raise QueryError(400, "after must be an integer") from None
        return history(self.run, after)


def query_params(query: str, known: tuple[str, ...]) -> dict[str, str]:
    """{name: value} of a query string that holds only `known` names, each at most once
    (QueryError 400 otherwise)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                          max_num_fields=MAX_FIELDS)
    except ValueError:
        raise QueryError(400, f"malformed query: name=value pairs joined by &, at most "
                              f"{MAX_FIELDS}") from None
    params = {}
    for name, value in pairs:
        if name not in known:
            raise QueryError(400, f"unknown parameter {_shown(name)} (known: {', '.join(known)})")
        if name in params:
            raise QueryError(400, f"{name} given more than once")
        params[name] = value
    return params


def _seq(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise QueryError(400, f"after must be a non-negative integer (a seq of /api/history), "
                              f"not {_shown(value)}")
    return int(value)


def _row_status(row: dict) -> dict:
    """/status?job= of a job whose run is not recorded (queued, or finished long ago)."""
    return {k: row.get(k) for k in ("state", "step", "total_steps", "loss", "accuracy", "workers",
                                   "started")}


class ServiceViews:
    """The views of the training service: /status lists its jobs, /status?job=ID and
    /api/history?job=ID show one job's run, /healthz names the jobs that stalled.

    Parameters
    ----------
    service : ServiceState
        What the views show.
    registry : prometheus_client.CollectorRegistry
        What /metrics encodes.
    stall_timeout : float
        Seconds without a step after which a running job makes /healthz answer 503.
    """

    def __init__(self, service: ServiceState, registry, stall_timeout: float):
        self.service, self.registry, self.stall_timeout = service, registry, stall_timeout

    def health(self) -> tuple[bool, str]:
        s = self.service.snapshot()
        why = [f"job {job_id}: {reason}" for job_id, run in s["unfinished"]
               if (reason := stalled(run, self.stall_timeout)) is not None]
        if why:
            return False, "stalled: " + "; ".join(why)
        n = s["by_state"]
        return True, f"ok: service, {n['running']} running, {n['queued']} queued"

    def status(self, query: str) -> dict:
        params = query_params(query, ("job",))
        if "job" not in params:
            s = self.service.snapshot()
            return {"service": {"version": __version__, "pool_workers": s["pool_workers"],
                                "idle_workers": s["idle_workers"], "jobs_by_state": s["by_state"]},
                    "jobs": s["rows"]}
        row, job = self._find(params["job"])
        if job is None:
            return {**_row_status(row), "job": row}
        return {**status(job.run), "job": row or {"id": job.job_id, "name": job.name}}

    def history(self, query: str) -> dict:
        params = query_params(query, ("job", "after"))
        if "job" not in params:
            raise QueryError(400, "job is required: /api/history?job=ID&after=SEQ "
                                  "(/status lists the jobs)")
        after = _seq(params.get("after", "0"))
        row, job = self._find(params["job"])
        if job is None:
            return {"seq": 0, "state": row.get("state"), "train": [], "val": []}
        return history(job.run, after)

    def _find(self, job_id: str):
        """(row, tracked job) of the id; QueryError 400 for no id, 404 for an unknown one."""
        if not job_id:
            raise QueryError(400, "job must be a job's id (/status lists them)")
        row, job = self.service.job(job_id)
        if row is None and job is None:
            raise QueryError(404, f"no job {_shown(job_id)} (/status lists the jobs)")
        return row, job
