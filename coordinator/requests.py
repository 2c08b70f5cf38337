"""What the training service answers a client (ddp-job): submit, list, status, cancel, fetch.

A request is one `request {op, args}` message; the answer is `reply {result}` (for
fetch of a model, followed by the file's bytes in a frame of their own) or `error
{reason, code}`: the one line ddp-job prints and the exit code it exits with. A
submitted job is checked as ddp-train checks its flags before anything is written;
only then does it get an id and a directory.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from ddp import protocol
from ddp.errors import DDPError, UsageError
from ddp.jobspec import check_inputs, check_name, check_priority, run_config

from .jobstore import EXIT_CODES, JobRecord

MAX_FETCH = 1 << 30     # bytes: the largest file fetch sends


def job_row(record: JobRecord, job=None) -> dict:
    """A job as list and status show it: its record, and while it runs its progress."""
    row = {"id": record.id, "name": record.name, "state": record.state, "priority": record.priority,
           "step": record.step, "total_steps": record.total_steps, "loss": record.loss,
           "accuracy": record.accuracy,
           "eta_seconds": None, "workers": 0, "submitted": record.submitted,
           "started": record.started, "ended": record.ended, "exit_code": record.exit_code,
           "message": record.message, "wait_exit_code": wait_code(record)}
    if job is not None:
        row.update(progress(job))
        if job.phase == "opening":
            row["message"] = "loading its data"
    return row


def progress(job) -> dict:
    """A running job's workers, windowed loss and accuracy, and the time it still needs."""
    loss = accuracy = eta = None
    if job.monitor is not None:
        with job.monitor.run.lock:
            loss, accuracy = job.monitor.run.train_loss, job.monitor.run.train_accuracy
    run = job.run
    if run is not None and job.phase == "running" and run.step > run.start_step:
        rate = (run.step - run.start_step) / max(time.perf_counter() - run.t_loop, 1e-9)
        eta = (run.total - run.step) / rate
    return {"workers": len(job.members), "loss": loss, "accuracy": accuracy, "eta_seconds": eta}


def wait_code(record: JobRecord) -> int | None:
    """What `ddp-job wait` exits with: None while it has not ended."""
    if not record.ended_state:
        return None
    return record.exit_code if record.exit_code is not None else EXIT_CODES[record.state]


class Requests:
    """The client side of the service's socket."""

    def __init__(self, service):
        self.service = service
        self.ops = {"submit": self.submit, "list": self.list, "status": self.status,
                    "cancel": self.cancel, "fetch": self.fetch}

    def handle(self, peer: bytes, msg: dict, role: str) -> None:
        pool = self.service.pool
        if role == "worker":
            return pool.reply(peer, "error", code=2, reason=(
                "this key is a worker's (--authorized-keys): it cannot submit, cancel or read "
                "jobs; give ddp-job a client key (ddp-keygen DIR --client NAME, in the service's "
                "--client-keys)"))
        op = self.ops.get(msg["op"])
        if op is None:
            return pool.reply(peer, "error", code=2, reason=f"unknown request {msg['op'][:40]!r}")
        try:
            result, payload = op(msg["args"])
        except DDPError as e:
            return pool.reply(peer, "error", reason=str(e)[:4000], code=e.exit_code)
        header = protocol.encode("reply", result=result)
        if payload is None:
            pool.send(peer, header)
        else:
            pool.send(peer, header, np.frombuffer(payload, dtype=np.uint8))

    def _record(self, args: dict) -> JobRecord:
        job_id = args.get("id")
        record = self.service.records.get(job_id) if isinstance(job_id, str) else None
        if record is None:
            raise UsageError(f"no job {str(job_id)[:40]!r} on this service (ddp-job list shows them)")
        return record

    def submit(self, args: dict):
        service = self.service
        name = check_name(args.get("name", ""))
        priority = check_priority(args.get("priority", 0))
        values = args.get("config")
        job_id = service.store.next_id(service.records)
        # checked with the outputs in the jobs' directory, which exists: nothing is written
        # until the job is valid
        cfg = run_config(values, service.store.jobs_dir)
        check_inputs(cfg)
        seq = max((r.seq for r in service.records.values()), default=0) + 1
        record = JobRecord(id=job_id, seq=seq, name=name, priority=priority, values=dict(values))
        service.store.create(record, lambda: run_config(values, service.store.job_dir(job_id)).to_toml())
        service.records[job_id] = record
        service.log.info(f"job {job_id} submitted ({name or 'no name'}, priority {priority}, "
                         f"--data {cfg.data})")
        return {"id": job_id, "job": job_row(record)}, None

    def list(self, args: dict):
        return {"jobs": self.service.rows()}, None

    def status(self, args: dict):
        record = self._record(args)
        return {"job": job_row(record, self.service.jobs.get(record.id))}, None

    def cancel(self, args: dict):
        service, record = self.service, self._record(args)
        if record.ended_state:
            raise UsageError(f"job {record.id} already ended ({record.state})")
        job = service.jobs.get(record.id)
        if job is None:  # queued: it leaves the queue
            service.scheduler.finish_record(record, "cancelled", 130, "cancelled before it started")
        else:            # running: it checkpoints and stops between two steps
            import signal

            job.stop(signal.SIGINT)
        service.log.info(f"job {record.id}: cancel requested")
        return {"job": job_row(record, job)}, None

    def fetch(self, args: dict):
        record = self._record(args)
        what = args.get("what", "model")
        if what not in ("model", "summary"):
            raise UsageError(f"fetch what={str(what)[:20]!r}: model or summary")
        name = "model.npz" if what == "model" else "summary.json"
        path = self.service.store.file(record.id, name)
        if not os.path.isfile(path):
            raise UsageError(f"job {record.id} has no {what} ({record.state}"
                             f"{': ' + record.message if record.message else ''})")
        if os.path.getsize(path) > MAX_FETCH:
            raise UsageError(f"job {record.id}'s {name} is larger than {MAX_FETCH >> 20} MiB")
        with open(path, "rb") as fh:
            data = fh.read()
        return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, data
