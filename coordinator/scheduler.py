"""Which jobs of the training service run, and on which workers.

Jobs run by priority, then submission order, up to --max-running at once; a job starts
only when the pool can give it its --min-workers beside those of the jobs running (or
when nothing runs). The pool is dealt out over the running jobs (`pool.targets`): a
job above its share gives back workers that hold no task of the step, which the jobs
below their share then invite. A worker that cannot take a job is not offered it again.
"""
from __future__ import annotations

import time
from concurrent.futures import Executor

from ddp.config import Config
from ddp.errors import DDPError
from ddp.jobspec import run_config
from ddp.log import Log
from ddp.monitor import Monitor

from .jobrun import JobRun, wire_id
from .jobstore import JobRecord, JobStore
from .membership import Membership
from .pool import targets

MAX_FRAME = 1 << 30          # the largest model (bytes) a job may have: libzmq drops larger frames


class Scheduler:
    """The service's jobs: the records (all of them) and the runs (opening, running, closing)."""

    def __init__(self, cfg: Config, log: Log, store: JobStore, pool: Membership, executor: Executor,
                 metrics=None):
        self.cfg, self.log, self.store, self.pool = cfg, log, store, pool
        self.executor, self.metrics = executor, metrics
        self.records: dict[str, JobRecord] = store.load()
        for record in self.records.values():
            if record.state == "running":  # the service stopped (or was killed) while it ran
                record.state = "queued"
                record.message = f"resumes from its newest checkpoint (was at step {record.step})"
                store.save(record)
        self.jobs: dict[str, JobRun] = {}

    def queued(self) -> list[JobRecord]:
        return sorted((r for r in self.records.values() if r.state == "queued" and r.id not in self.jobs),
                      key=JobRecord.order)

    def schedule(self) -> None:
        """Start what may start; then deal the pool out over the running jobs."""
        active = [j for j in self.jobs.values() if j.phase in ("opening", "running")]
        for record in self.queued():
            if len(active) >= self.cfg.max_running:
                break
            need = sum(j.cfg.min_workers for j in active)
            wants = record.values.get("min_workers", 1)  # checked when it was submitted
            if active and len(self.pool) < need + wants:
                break  # it would starve the running jobs: it waits for more workers
            job = self.start(record)
            if job is not None:
                active.append(job)
        running = sorted((j for j in active if j.phase == "running"), key=lambda j: j.record.order())
        if not running:
            return
        share = targets(running, len(self.pool))
        for job, want in zip(running, share):
            surplus = job.members.size() - want
            for member in job.members.movable()[:max(surplus, 0)]:
                job.members.release(member, "moves to another job")
        idle = [m for m in self.pool.all() if not m.job]
        for job, want in zip(running, share):
            while job.members.size() < want:
                member = next((m for m in idle if job.eligible(m)), None)
                if member is None:
                    break
                idle.remove(member)
                job.invite(member)

    def start(self, record: JobRecord) -> JobRun | None:
        try:
            cfg = run_config(record.values, self.store.job_dir(record.id))
        except DDPError as e:  # e.g. a record of another version: said, and the next job starts
            self.finish_record(record, "failed", e.exit_code, str(e))
            return None
        now = time.time()
        if record.queue_seconds is None:
            record.queue_seconds = now - record.submitted
            if self.metrics is not None:
                self.metrics.observe_queue(record.queue_seconds)
        record.state, record.started, record.message = "running", now, ""
        self.store.save(record)
        job = JobRun(record, cfg, wire_id(self.cfg.state_dir, record.id, cfg), self.pool, self.log,
                     self.monitor_for(record), self.executor, MAX_FRAME)
        self.jobs[record.id] = job
        self.log.info(f"job {record.id} ({record.name or 'no name'}) started")
        return job

    def monitor_for(self, record: JobRecord):
        """A factory of the job's Monitor once its model is known (its record in its directory)."""
        path = self.store.file(record.id, "log.jsonl")

        def make(setup) -> Monitor:
            kw = dict(total_steps=setup.total_steps, layers=setup.layout.layers,
                      parameters=setup.layout.size, lr=setup.cfg.lr,
                      classify=setup.cfg.loss == "cross-entropy", jsonl=path)
            if self.metrics is not None:
                monitor = self.metrics.add_job(record.id, name=record.name, **kw)
            else:
                monitor = Monitor(backend="zmq", stall_timeout=self.cfg.stall_timeout,
                                  warn=self.log.warn, **kw)
            monitor.event("start", backend="zmq", job=record.id, total_steps=setup.total_steps,
                          parameters=setup.layout.size, config=setup.cfg.to_dict())
            return monitor
        return make

    def retire(self, job: JobRun) -> None:
        del self.jobs[job.record.id]
        state, code, message = job.outcome
        if state == "queued":  # the service is stopping: it resumes on the next start
            job.record.state, job.record.message = "queued", message
            self.store.save(job.record)
            return
        self.finish_record(job.record, state, code, message)
        if self.metrics is not None:
            self.metrics.job_finished(job.record.id)
            self.metrics.observe_duration(job.record.ended - job.record.started)
        self.log.info(f"job {job.record.id} {state}")

    def finish_record(self, record: JobRecord, state: str, code: int | None, message: str) -> None:
        record.state, record.exit_code, record.message = state, code, message
        record.ended = time.time()
        self.store.save(record)
