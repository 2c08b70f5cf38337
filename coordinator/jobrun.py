"""One job running inside the training service: opened, stepped, closed.

A job's life is three phases. Opening (in a thread: the data is loaded and checked,
the parameters come from its newest checkpoint or the seed) and closing (in a thread:
the checkpoint, the final evaluation and the model) never hold up the service's loop,
which keeps every other job's workers answered. In between, `tick` advances the job
a step at a time without blocking: cut the step's batch over the job's members
(`Shards`, as the one-job coordinator does), wait for their sums, apply the update
through the same `Run` as ddp-train. Which workers computed which rows never changes
the sum's order, so the trajectory is the one of a single-process run.
"""
from __future__ import annotations

import hashlib
import json
import signal
import time
import traceback
from concurrent.futures import Executor, Future

import numpy as np

from ddp import protocol
from ddp.command import write_result
from ddp.config import Config, job_config
from ddp.errors import EXIT_INTERNAL, DDPError, DivergedError
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.setup import prepare
from ddp.worker.compute import ShardCompute

from .exchange import LocalExchange
from .jobstore import JobRecord
from .membership import Member, Membership
from .pool import JobMembers
from .run import Evaluator, Run
from .shards import Deadline, Shards

EVAL_ROWS = 4096


class JobLog(Log):
    """The service's log, each line saying which job it is about."""

    def __init__(self, base: Log, job_id: str):
        super().__init__(0, base.prog, base.stream, "info" if base.level == 0 else "warning")
        self.tag = f"job {job_id}: "

    def _write(self, msg: str) -> None:
        super()._write(self.tag + msg)


class Ending:
    """Why a running job stops before its last step: the signal it counts as
    (SIGINT for a cancel, as Ctrl-C; SIGTERM when the service stops)."""

    def __init__(self, signum: int):
        self.signum = signum


def wire_id(state_dir: str, job_id: str, cfg: Config) -> str:
    """The job's protocol id: its own in this service, the same after a restart."""
    text = json.dumps([state_dir, job_id, job_config(cfg)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class JobRun:
    """A job of the service from its start to its end (`phase`: opening, running,
    closing, ended); `record` is updated as it goes (the service writes it)."""

    def __init__(self, record: JobRecord, cfg: Config, wire: str, pool: Membership, log: Log,
                 monitor_for, executor: Executor, max_frame: int):
        self.record, self.cfg, self.wire, self.pool = record, cfg, wire, pool
        self.log, self.max_frame = JobLog(log, record.id), max_frame
        self.monitor_for = monitor_for         # setup → the job's Monitor (made once it opened)
        self.monitor: Monitor | None = None
        self.phase = "opening"
        self.members = JobMembers(pool, wire, self.log, None)
        self.unable: dict[bytes, str] = {}     # workers that cannot take it, and why
        self.ending: Ending | None = None      # cancel or service stop, honoured between steps
        self.setup = self.run = self.shards = self.exchange = None
        self.fingerprint = None
        self.in_flight = False                 # a step's shards are out
        self.t_step = 0.0
        self.outcome: tuple[str, int, str] | None = None   # (state, exit code, message)
        self.future: Future = executor.submit(self._open)
        self.executor = executor

    # --- opening -------------------------------------------------------------------

    def _open(self) -> None:
        self.setup, self.run, self.exchange = open_job(self.cfg, self.log, self.max_frame)
        self.fingerprint, self.job = self.setup.fingerprint(), job_config(self.setup.cfg)

    def _opened(self) -> None:
        if not self._survived(self.future.result):
            return
        setup = self.setup
        self.monitor = self.run.monitor = self.members.monitor = self.monitor_for(setup)
        self.shards = Shards(self.members, self.log, self.monitor, self.wire,
                             protocol.wire_dtype(setup.cfg.dtype), setup.layout.size,
                             Deadline(self.cfg.shard_timeout or self.pool.timeout))
        self.shards.step = self.run.step
        self.record.total_steps = setup.total_steps
        self.phase = "running"
        self.run.start_clock()
        self.monitor.set_state("waiting-for-workers")
        self.log.info(f"{len(setup.train)} training samples, {setup.layout.size:,} parameters, "
                      f"{setup.total_steps} steps; data fingerprint {self.fingerprint}")

    # --- workers ---------------------------------------------------------------------

    def invite(self, member: Member) -> None:
        self.members.invite(member, self.job, self.fingerprint)

    def ready(self, member: Member, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            return self.cannot(member, f"its data differs from the coordinator's (--data "
                                       f"{self.cfg.data}: fingerprint {fingerprint} there, "
                                       f"{self.fingerprint} here)")
        self.members.admit(member, self.shards.step)
        self.shards.assign_unassigned(member)

    def cannot(self, member: Member, reason: str) -> None:
        """A worker cannot take this job: it goes back to the pool; when no worker of the
        pool can, the job fails with their reason."""
        self.log.warn(f"{member.name} cannot take the job: {reason}")
        self.unable[member.peer] = reason
        self.members.release(member, "cannot take the job")
        if self.pool.members and all(peer in self.unable for peer in self.pool.members):
            self._end("failed", 2, f"no worker can take the job: {reason}")

    def eligible(self, member: Member) -> bool:
        return member.peer not in self.unable

    def drop(self, member: Member, why: str, lost: bool = False) -> None:
        """A member gone from the service: its rows of the step go to the others."""
        if self.shards is not None and member.joined:
            self.shards.drop_member(member, why, lost)
        else:
            self.members.remove(member, why, lost)

    # --- steps -----------------------------------------------------------------------

    def tick(self) -> None:
        """Advance without blocking: finish opening, apply a step whose sums are all
        back and start the next, or begin closing."""
        if self.phase == "opening" and self.future.done():
            self._opened()
        if self.phase == "closing" and self.future.done():
            self._closed()
        if self.phase != "running":
            return
        self._survived(self._advance)

    def _survived(self, step) -> bool:
        """Run `step`; a failure ends the job (diverged, failed, or failed by a bug, said
        with its traceback in the log), never the service or another job."""
        try:
            step()
            return True
        except DivergedError as e:
            self._end("diverged", e.exit_code, str(e), checkpoint=False)
        except DDPError as e:
            self._end("failed", e.exit_code, str(e), checkpoint=self.phase == "running")
        except Exception as e:
            traceback.print_exc()
            self._end("failed", EXIT_INTERNAL, f"internal error ({type(e).__name__}: {e})",
                      checkpoint=False)
        return False

    def _advance(self) -> None:
        run, shards = self.run, self.shards
        if self.in_flight and shards.all_back():
            loss, correct = shards.sum_(self.exchange.grad)
            if loss is None:
                return  # some shards went back for recomputation
            n = self.setup.schedule.batch_len(run.step)
            wall = time.perf_counter() - self.t_step
            compute = min(shards.step_compute, wall)
            self.in_flight = False
            run.update_(loss, correct, n, self.t_step, compute, wall - compute,
                        weight_sum=shards.weight_sum)
            self.record.step, self.record.last_step = run.step, time.time()
        if not self.in_flight and (run.done or self.ending is not None):
            return self._close()
        # as a one-job coordinator's, /status says when no step is made for want of workers
        short = not self.members if self.in_flight else len(self.members) < self.cfg.min_workers
        self.monitor.set_state("waiting-for-workers" if short else "training")
        if self.in_flight or short:
            return
        if self.record.first_step is None or self.record.first_step < self.record.started:
            self.record.first_step = time.time()
        shards.step, shards.step_compute = run.step, 0.0
        self.t_step = time.perf_counter()
        shards.start(run.step, run.params, self.setup.schedule.batch_len(run.step))
        self.in_flight = True

    def result(self, member: Member, msg: dict, frames: list) -> None:
        if self.phase != "running":
            return self.members.drop("stale")
        self._survived(lambda: self.shards.result(member, msg, frames))

    def check_deadlines(self, now: float) -> None:
        if self.phase == "running" and self.in_flight:
            self.shards.check_deadlines(now)

    # --- the end ---------------------------------------------------------------------

    def stop(self, signum: int) -> None:
        """End before the last step (a cancel: SIGINT, the service stopping: SIGTERM):
        between two steps, with a checkpoint."""
        if self.ending is None:
            self.ending = Ending(signum)
        if self.phase == "running" and self.in_flight:
            self.in_flight = False  # the step's shards are dropped: it is computed again
        if self.phase == "running":
            self._close()

    def _close(self) -> None:
        self.members.release_all(self.shards, "leaves: the job is over")
        self.phase = "closing"
        self.future = self.executor.submit(self._finish)

    def _finish(self) -> dict:
        ending = self.ending or Ending(0)
        summary = self.run.finish(ending, {"backend": "zmq", "job": self.record.id,
                                           "workers_lost": self.pool.lost,
                                           "shard_timeouts": self.shards.timeouts})
        summary["wall_seconds"] = time.time() - (self.record.started or time.time())
        write_result(self.cfg.summary_json, "summary.json", lambda fh: _dump(fh, summary), binary=False)
        return summary

    def _closed(self) -> None:
        if not self._survived(self.future.result):
            return
        summary = self.future.result()
        self.record.step = summary["steps"]
        if self.ending is None:
            self.record.loss, self.record.accuracy = summary["final_loss"], summary["train_accuracy"]
            self.log.info(f"done: {summary['steps']} steps, loss {summary['final_loss']:.4f}")
            self._end("done", 0, "", summary)
        elif self.ending.signum == signal.SIGINT:
            self._end("cancelled", 130, f"cancelled at step {summary['steps']}", summary)
        else:
            self._end("queued", None, f"interrupted at step {summary['steps']} by a stop of the "
                                      f"service; resumes from its checkpoint", summary)

    def _end(self, state: str, code: int | None, message: str, summary: dict | None = None,
             checkpoint: bool = True) -> None:
        if self.phase == "running" and checkpoint and self.run is not None:
            try:
                self.run.write_checkpoint()
            except DDPError as e:
                message += f" (and its checkpoint failed: {e})"
        self.members.release_all(self.shards, f"leaves: the job ended ({state})")
        self.phase = "ended"
        self.outcome = (state, code, message)
        if self.monitor is not None and state == "queued":
            self.monitor.close_record()
        elif self.monitor is not None:
            self.monitor.close(code, summary)
        if message and state != "done":
            (self.log.info if state in ("queued", "cancelled") else self.log.warn)(message)


def open_job(cfg: Config, log: Log, max_frame: int):
    """(setup, run, exchange) of a job: its data loaded and checked, its parameters from
    its newest checkpoint or the seed (in the opening thread: this reads every byte)."""
    setup = prepare(cfg)
    dtype = np.dtype(setup.cfg.dtype)
    if setup.layout.size * dtype.itemsize > max_frame:
        raise DDPError(f"the model's {setup.layout.size:,} parameters are larger than the "
                       f"service's largest message ({max_frame >> 20} MiB)")
    setup.fingerprint()
    exchange = LocalExchange(setup.layout.size, 0, dtype)
    compute = ShardCompute(setup.layout, setup.cfg.activation, setup.cfg.loss, dtype,
                           min(EVAL_ROWS, max(len(setup.train), 1)))
    run = Run(setup, log, exchange, Evaluator(setup, compute, exchange))
    run.begin(run.load_start())
    return setup, run, exchange


def _dump(fh, summary: dict) -> None:
    json.dump(summary, fh, indent=2, sort_keys=True, default=float)
    fh.write("\n")
