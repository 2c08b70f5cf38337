"""A ZeroMQ worker: take the job, then parameters and rows of each step; send back sums.

The main thread owns the connection (worker.connection): it answers the
coordinator, sends heartbeats (also while a shard is being computed) and notices
a coordinator that went silent, in which case it reconnects and says hello
again, so a restarted coordinator gets its workers back by itself. A compute
thread (worker.compute_thread) does the numpy work, so heartbeats never wait
behind a large matrix product.

What comes from the coordinator is checked as well: the job description like a
config file, every header by `ddp.protocol`, and the parameter frame's exact size.
"""
from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import zmq
from threadpoolctl import threadpool_limits

from ddp import protocol
from ddp.errors import DDPError, EXIT_OK, EXIT_SIGNAL_BASE, UsageError
from ddp.log import Log
from ddp.protocol import ProtocolError
from ddp.signals import StopRequest
from ddp.threads import host_cores, host_id

from .compute_thread import ComputeThread, DataCache, Job
from .connection import Connection, Unreachable, check_endpoint, load_keys, query_status

# what was defined here before the split, for the callers that import it from here
__all__ = ["WorkerService", "Job", "Unreachable", "load_keys", "query_status"]

HELLO_EVERY = 2.0       # seconds between hellos while no coordinator answers


class Hellos:
    """When a worker without a coordinator says hello (every HELLO_EVERY s), and when it
    gives up: after --retry-for seconds without hearing from one."""

    def __init__(self, endpoint: str, log: Log, retry_for: float | None):
        self.endpoint, self.log, self.retry_for = endpoint, log, retry_for
        self.last = -math.inf                 # the last hello
        self.contact = time.monotonic()       # the coordinator last heard (or the start)
        self.last_wait_log = time.monotonic()

    def due(self, now: float) -> bool:
        """Whether to say hello now; Unreachable once --retry-for is over."""
        silent = now - self.contact
        if self.retry_for is not None and silent > self.retry_for:
            raise Unreachable(f"no answer from a coordinator at {self.endpoint} for "
                              f"{silent:.0f} s (--retry-for {self.retry_for:g})")
        if now - self.last_wait_log > 30:
            self.last_wait_log = now
            self.log.info(f"waiting for a coordinator at {self.endpoint}")
        if now - self.last <= HELLO_EVERY:
            return False
        self.last = now
        return True

    def now(self) -> None:
        """The next hello is due at once: on a new socket, when told to rejoin, and when a
        connection was just made. A hello sent while there was no connection was dropped
        (the socket queues nothing then), and waiting for the next tick would add up to
        HELLO_EVERY to every reconnect."""
        self.last = -math.inf


class ThreadShare:
    """The BLAS threads the coordinator sizes for this worker (its share of the host),
    unless `pinned` by --threads or the environment. They are set from the main thread,
    which OpenBLAS honours (a limit set in another thread is not), while the compute
    thread has nothing to do: it gets its next task from the main thread only."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.applied = self.wanted = None

    def apply(self, log: Log) -> None:
        if self.pinned or self.wanted in (None, self.applied):
            return
        self.applied = self.wanted
        threadpool_limits(limits=self.applied)
        log.info(f"{self.applied} BLAS thread{'s' * (self.applied > 1)}: this worker's share of "
                 f"its host, as the coordinator counts the workers there")


class WorkerService:
    """One worker's life: hello, job, ready, member; again after every reconnect.

    `state` is "hello" (asking for a job), "idle" (a service's worker with no job),
    "ready" (job loaded, fingerprint sent) or "member" (welcomed: tasks are computed).
    A service moves its workers from job to job: a new job message, or idle, may come
    in any state but hello. `generation` counts memberships, so a result computed for
    an earlier one is not sent. `pinned`: the BLAS threads were fixed by --threads or
    the environment, so the coordinator's share of the host is not applied.
    """

    def __init__(self, endpoint: str, log: Log, stop: StopRequest, keys=None,
                 retry_for: float | None = None, pinned: bool = True):
        check_endpoint(endpoint)
        self.log, self.stop, self.retry_for = log, stop, retry_for
        self.cache = DataCache()
        self.pooled = False       # the coordinator is a service: stay when a job cannot be taken
        self.threads = ThreadShare(pinned)
        self.ctx = zmq.Context()
        self.compute = ComputeThread(self.ctx)
        self.compute.start()
        self.conn = Connection(self.ctx, endpoint, keys)
        self.job: Job | None = None
        self.job_id = None
        self.state = "hello"
        self.generation = 0
        self.heartbeat, self.timeout = 0.5, 3.0
        self.last_heard = 0.0
        self.hellos = Hellos(endpoint, log, retry_for)
        # started by ddp-train --backend zmq: leave with the process that started us
        parent = os.environ.get("DDP_WORKER_PARENT", "")
        self.parent = int(parent) if parent.isdigit() else None

    @property
    def endpoint(self) -> str:
        return self.conn.endpoint

    def _connect(self) -> None:
        self.conn.open()
        self.state = "hello"
        self.hellos.now()
        self.generation += 1  # results computed for an earlier membership are not sent
        self.compute.drop_tasks()

    # --- the loop ---------------------------------------------------------------

    def run(self) -> int:
        self._connect()
        self.log.info(f"ddp-worker: connecting to {self.endpoint}"
                      f"{' (CURVE)' if self.conn.keys else ''}")
        try:
            while True:
                if self.stop.signum:
                    return self._leave()
                poller = zmq.Poller()  # anew: a reconnect replaces the socket
                for sock in (self.compute.wake, self.conn.sock, self.conn.monitor):
                    poller.register(sock, zmq.POLLIN)
                events = dict(poller.poll(int(min(self.heartbeat, 0.5) * 1000)))
                if self.compute.wake in events:
                    self._send_results()
                if self.conn.monitor in events and self.conn.check_handshakes():
                    self.hellos.now()
                if self.conn.sock in events:
                    code = self._receive()
                    if code is not None:
                        return code
                self._timers()
        finally:
            self.compute.stop()
            self.conn.close()
            if self.compute.close(timeout=1.0):
                self.ctx.term()

    def _timers(self) -> None:
        if self.compute.idle():
            self.threads.apply(self.log)
        now = time.monotonic()
        if self.parent is not None and os.getppid() != self.parent:
            raise Unreachable("the ddp-train process that started this worker is gone")
        if self.state == "hello":
            if self.hellos.due(now):
                self.conn.send(protocol.encode("hello", host=host_id(), cores=host_cores()))
            return
        if now - self.last_heard > self.timeout:
            self.log.info(f"coordinator silent for {now - self.last_heard:.1f} s; reconnecting")
            self._connect()
        elif now - self.conn.last_sent > self.heartbeat:
            self.conn.send(protocol.encode("heartbeat", job=self.job_id or ""))

    def _send_results(self) -> None:
        for generation, msg, loss, correct, weight, entry, seconds in self.compute.finished():
            tracker = None
            if generation == self.generation and self.state == "member":
                header = result_header(self.job_id, msg, loss, correct, weight, seconds)
                tracker = self.conn.send(header, entry[0] if np.isfinite(loss) else None)
            if tracker is None:
                entry[1] = False  # the buffer is free again
            else:
                entry[2] = tracker  # free once libzmq has sent it

    def _receive(self) -> int | None:
        for _ in range(100):
            frames = self.conn.recv()
            if frames is None:
                return None
            try:
                msg = decode_frames(frames)
            except ProtocolError as e:
                self.log.warn(f"ignoring an invalid message from the coordinator ({e})")
                continue
            self.last_heard = self.hellos.contact = time.monotonic()
            code = self._on_message(msg, frames)
            if code is not None:
                return code
        return None

    def _on_message(self, msg: dict, frames: list) -> int | None:
        kind = msg["type"]
        if kind == "job":
            if self.state == "hello" or (msg["pool"] and msg["job"] != self.job_id):
                self._take_job(msg)
        elif kind == "idle":
            if self.state != "idle":
                self._idle(msg)
        elif kind == "threads":
            self.threads.wanted = msg["threads"]
        elif kind == "welcome":
            if self.state == "ready" and msg["job"] == self.job_id:
                self.state = "member"
                self.log.info(f"joined job {self.job_id} at step {msg['step']} "
                              f"({self.job.n_samples} training samples)")
        elif kind == "refuse":
            if not self.pooled:
                raise UsageError(f"the coordinator refused this worker: {msg['reason']}")
            self.log.warn(f"not taking part in job {self.job_id}: {msg['reason']}")
        elif kind == "rejoin":
            if self.state != "hello":
                self.log.info("the coordinator does not know this worker (restarted?); joining again")
                self.state = "hello"
                self.hellos.now()
                self.generation += 1
        elif kind == "stop":
            self.log.info(f"stopping: {msg['reason']}")
            return EXIT_OK
        elif kind == "task":
            self._take_task(msg, frames[1])
        return None

    def _idle(self, msg: dict) -> None:
        """A service's worker with no job: wait (heartbeats keep the connection)."""
        if self.state != "hello":
            self.log.info("no job for this worker; waiting")
        self.heartbeat, self.timeout = msg["heartbeat"], msg["timeout"]
        self.pooled = True
        self.state, self.job_id = "idle", None
        self.generation += 1  # what was computed for the last job is not sent
        self.compute.drop_tasks()
        self.last_heard = time.monotonic()

    def _take_job(self, msg: dict) -> None:
        self.heartbeat, self.timeout = msg["heartbeat"], msg["timeout"]
        self.pooled = msg["pool"]
        if self.state in ("ready", "member"):  # moved to another job by the service
            self.generation += 1
            self.compute.drop_tasks()
        self.job_id = msg["job"]
        self.last_heard = time.monotonic()
        if self.job is None or self.job.description != msg["config"]:
            try:
                self.job = load_job(msg, self.cache, self.log)
            except DDPError as e:
                if not self.pooled:
                    raise type(e)(f"cannot take the coordinator's job: {e}")
                self.log.warn(f"cannot take job {msg['job']}: {e}")
                self.conn.send(protocol.encode("unable", job=msg["job"], reason=str(e)[:4000]))
                self.state, self.job_id = "idle", None
                return
        self.state = "ready"
        self.last_heard = time.monotonic()
        self.conn.send(protocol.encode("ready", job=self.job_id, fingerprint=self.job.fingerprint))

    def _take_task(self, msg: dict, frame) -> None:
        if self.state != "member" or msg["job"] != self.job_id:
            return
        job = self.job
        try:
            params = task_params(msg, frame, job)
        except ProtocolError as e:
            self.log.warn(f"ignoring an invalid task from the coordinator ({e})")
            return
        self.compute.tasks.put((self.generation, msg, params, job))

    def _leave(self) -> int:
        if self.state == "member" and self.job_id:
            self.conn.sock.setsockopt(zmq.LINGER, 1000)
            self.conn.send(protocol.encode("bye", job=self.job_id))
        self.log.info(f"leaving: {signal.Signals(self.stop.signum).name}")
        return EXIT_SIGNAL_BASE + self.stop.signum


def load_job(msg: dict, cache: DataCache, log: Log) -> Job:
    """The job a coordinator sent: its data from the cache, or loaded (DDPError if it cannot be)."""
    log.info(f"loading the data of job {msg['job']} ({msg['config'].get('data')!r})")
    job = Job(msg["config"], cache, msg["fingerprint"])
    if job.reused:
        log.info(f"job {msg['job']}: its data is already loaded")
    return job


def task_params(msg: dict, frame, job: Job) -> np.ndarray:
    """A task's parameters, after checking its rows and the frame's exact size."""
    if not msg["lo"] < msg["hi"] <= job.schedule.batch_len(msg["step"]):
        raise ProtocolError(f"rows [{msg['lo']}, {msg['hi']}) outside step {msg['step']}'s batch")
    return protocol.array_from_frame(frame.buffer, job.dtype, job.layout.size)


def result_header(job_id: str, msg: dict, loss: float, correct: int, weight: float,
                  seconds: float) -> bytes:
    """The answer to a task: its sums' header ("grads"), or "diverged" for a non-finite loss."""
    if not np.isfinite(loss):
        return protocol.encode("diverged", job=job_id, step=msg["step"], task=msg["task"])
    return protocol.encode("grads", job=job_id, step=msg["step"], task=msg["task"],
                           n=msg["hi"] - msg["lo"], loss=float(loss), correct=int(correct),
                           weight=float(weight), seconds=seconds)


def decode_frames(frames: list) -> dict:
    """A coordinator's message (a header, and an array frame for a task), checked."""
    if len(frames) not in (1, 2):
        raise ProtocolError(f"{len(frames)} frames")
    msg = protocol.decode(frames[0].bytes, protocol.FROM_COORDINATOR, protocol.MAX_REPLY_HEADER)
    if (len(frames) == 2) != (msg["type"] in protocol.ARRAY_TYPES):
        raise ProtocolError("array frame mismatch")
    return msg
