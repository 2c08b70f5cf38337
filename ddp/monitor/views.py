"""The JSON views of a RunState the HTTP server answers with: /healthz, /status and
/api/history, each built from the recorded state when asked for."""
from __future__ import annotations

import time

from .. import __version__
from .state import RUNNING, RunState, finite


def health(run: RunState, stall_timeout: float) -> tuple[bool, str]:
    """(healthy, one line): unhealthy when a running run completed no step for longer
    than `stall_timeout` seconds."""
    with run.lock:
        state, step, idle = run.state, run.step, time.monotonic() - run.last_progress
    if state in RUNNING and idle > stall_timeout:
        return False, (f"stalled: no step completed for {idle:.0f} s (bound {stall_timeout:g} s, "
                       f"--stall-timeout) at step {step}")
    return True, f"ok: {state} at step {step}/{run.total_steps}"


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
