"""How gradients meet over ZeroMQ: a coordinator that holds the model and hands out shards.

One step:
  1. wait until --min-workers workers are members;
  2. cut the step's global batch into contiguous shards over the members present
     (by sample index, as MPI cuts it over ranks) and send each its rows [lo, hi)
     with the current parameters;
  3. workers send back Σ per-sample gradients, loss sum and correct count;
     a worker that leaves, dies (silent for --worker-timeout, or its connection
     dropped), sends something invalid or misses its shard's deadline has its
     shard recomputed by another;
  4. add the shards' sums in shard order, so the result does not depend on who
     computed what or in which order results arrived;
  5. `Run.apply_` divides by the global sample count and steps, exactly as under MPI.

Nothing from the network is trusted: headers are decoded by `ddp.protocol`,
arrays are accepted only with the model's exact size, a gradient sum is applied
only after it is checked to be finite, and libzmq itself drops any frame larger
than the largest valid one. Whatever does not fit is dropped and counted; a peer
that keeps sending it is ignored from then on.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import statistics
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from ddp import data as ddata
from ddp import keys as keyfiles
from ddp import protocol
from ddp.config import Config, job_config
from ddp.errors import DDPError, DivergedError, UsageError
from ddp.log import Log
from ddp.monitor import Monitor
from ddp.protocol import ProtocolError
from worker.compute import ShardCompute

from ddp.setup import Setup
from ddp.signals import StopRequest

from .exchange import LocalExchange
from .run import Evaluator, Run

STRIKES_BEFORE_BAN = 20     # invalid messages after which a peer is ignored
MAX_TRACKED_PEERS = 4096    # bound on per-peer bookkeeping of unknown peers
EVAL_ROWS = 4096
# A shard's deadline: DEADLINE_FACTOR × the median turnaround (task sent → result in) of the
# last RECENT_SHARDS shards, and never less than --shard-timeout (default: --worker-timeout,
# the silence that already counts as dead). A peer that heartbeats but never answers (or
# whose compute thread hung) would otherwise hold the step for ever. Until one shard was
# measured (start-up: BLAS, page cache) the deadline is FIRST_SHARD_DEADLINE.
DEADLINE_FACTOR = 10
RECENT_SHARDS = 64
FIRST_SHARD_DEADLINE = 60.0
MISSES_BEFORE_DROP = 3      # deadlines missed in a row after which a worker is dropped


@dataclass
class Member:
    peer: bytes                # ZeroMQ routing id
    name: str                  # for log lines: "worker 3 (host pid 1234)"
    joined_step: int
    last_heard: float
    last_sent: float = 0.0
    tasks: set = field(default_factory=set)
    rows: int = 0              # rows of outstanding tasks
    misses: int = 0            # shard deadlines missed in a row


@dataclass
class Task:
    id: int
    lo: int
    hi: int
    peer: bytes | None = None
    sent: float = 0.0              # monotonic time it was sent to its peer
    result: tuple | None = None    # (gradient sum view, frame holding it, loss sum, correct)
    diverged: int = 0              # times a worker reported a non-finite loss for these rows


class CurveKeys:
    """The coordinator's key pair and the public keys it lets in (a ZAP callback)."""

    def __init__(self, secret_file: str, authorized_dir: str):
        self.public, self.secret = keyfiles.read_secret(secret_file, "--curve-secret")
        self.allowed = keyfiles.authorized(authorized_dir)
        self.refused = 0

    def callback(self, domain, key: bytes) -> bool:  # runs in the authenticator's thread
        ok = key in self.allowed
        if not ok:
            self.refused += 1
        return ok


def check_bind(cfg: Config, log: Log) -> None:
    try:
        loopback = protocol.is_loopback(cfg.bind)
    except ValueError as e:
        raise UsageError(f"--bind {cfg.bind}: {e}")
    if loopback or cfg.curve_secret:
        return
    if not cfg.insecure:
        raise UsageError(f"--bind {cfg.bind} may be reachable from other hosts (only ipc://, "
                         f"127.x.x.x, [::1] and localhost count as loopback; names are not "
                         f"resolved for this check): give --curve-secret and --authorized-keys "
                         f"(see ddp-keygen), bind to 127.0.0.1, or accept the risk with --insecure")
    log.warn(f"--bind {cfg.bind} without CURVE (--insecure): anyone who can reach it can join "
             f"the job and read the model; traffic is not encrypted")


class Coordinator:
    """The ROUTER side: membership, shard assignment, validation and summation."""

    def __init__(self, setup: Setup, log: Log, stop: StopRequest, endpoint: str,
                 keys: CurveKeys | None = None, monitor: Monitor | None = None):
        cfg = setup.cfg
        self.setup, self.cfg, self.log, self.stop = setup, cfg, log, stop
        self.P = setup.layout.size
        self.dtype = protocol.wire_dtype(cfg.dtype)
        self.job_id = protocol_job_id(cfg)
        self.job = job_config(cfg)
        self.fingerprint = setup.fingerprint()
        self.timeout = cfg.worker_timeout
        self.heartbeat = max(0.05, self.timeout / 6)
        self.keys = keys
        self.monitor = monitor

        # two I/O threads: parameters go out to (and sums come in from) two workers at once
        self.ctx = zmq.Context(io_threads=2)
        self.auth = None
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # sending to a gone peer raises at once
        # libzmq applies the limit to the frame as it arrives, i.e. encrypted under CURVE
        # (a few dozen bytes longer): leave room for that
        sock.setsockopt(zmq.MAXMSGSIZE, max(self.P * self.dtype.itemsize, protocol.MAX_HEADER) + 256)
        sock.setsockopt(zmq.RCVHWM, 100)             # a flooding peer is throttled by TCP
        if keys is not None:
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", keys)
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self.close()
            hint = " (is another coordinator running?)" if e.errno == errno.EADDRINUSE else ""
            raise UsageError(f"--bind {endpoint}: cannot bind ({e.strerror}){hint}")
        self.sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.disconnects = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.disconnects, zmq.POLLIN)

        self.members: dict[bytes, Member] = {}
        self.pending: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # sent the job
        self.strikes: OrderedDict[bytes, int] = OrderedDict()
        self.banned: OrderedDict[bytes, None] = OrderedDict()
        self.dropped: Counter = Counter()
        self.names = itertools.count(1)
        self.task_ids = itertools.count(1)
        self.tasks: dict[int, Task] = {}
        self.step = 0
        self.state = "starting"
        self.params_buf = None
        self.probe_until = 0.0
        self.last_probe = 0.0
        self.bytes_sent = self.bytes_received = 0
        self.steps_done = 0
        self.lost = 0
        self.recoveries: list[float] = []
        self._recovering_since: float | None = None
        self._last_wait_log = 0.0
        self.watchdog = None  # called on every poll (the embedded run checks its children)
        self.step_compute = 0.0  # the slowest shard's compute seconds in the current step
        self.turnarounds: deque = deque(maxlen=RECENT_SHARDS)  # seconds, measured here
        self.shard_floor = cfg.shard_timeout or cfg.worker_timeout
        self.shard_timeouts = 0

    # --- sending ------------------------------------------------------------------

    def _send(self, peer: bytes, header: bytes, array: np.ndarray | None = None) -> bool:
        """Send without blocking; False when the peer is gone or not reading."""
        try:
            if array is None:
                self.sock.send_multipart([peer, header], flags=zmq.NOBLOCK)
            else:
                self.sock.send_multipart([peer, header], flags=zmq.NOBLOCK | zmq.SNDMORE)
                self.sock.send(array, flags=zmq.NOBLOCK, copy=False)
                self.bytes_sent += array.nbytes
            self.bytes_sent += len(header)
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                return False
            raise
        member = self.members.get(peer)
        if member is not None:
            member.last_sent = time.monotonic()
        return True

    def _reply(self, peer: bytes, type_: str, **fields) -> None:
        self._send(peer, protocol.encode(type_, **fields))

    # --- membership -----------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self.monitor is not None:
            self.monitor.reject(reason)

    def _strike(self, peer: bytes, reason: str) -> None:
        self._drop(reason)
        n = self.strikes.pop(peer, 0) + 1
        self.strikes[peer] = n
        while len(self.strikes) > MAX_TRACKED_PEERS:
            self.strikes.popitem(last=False)
        if n >= STRIKES_BEFORE_BAN:
            self.banned[peer] = None
            while len(self.banned) > MAX_TRACKED_PEERS:
                self.banned.popitem(last=False)
            member = self.members.get(peer)
            if member is not None:
                self._drop_member(member, f"sent {n} invalid messages; ignoring it from now on")

    def _admit(self, peer: bytes, name: str) -> None:
        now = time.monotonic()
        member = Member(peer, name, self.step, last_heard=now, last_sent=now)
        self.members[peer] = member
        self.log.info(f"{name} joined ({len(self.members)} worker{'s' * (len(self.members) > 1)}); "
                      f"it takes a shard from the next step")
        self._reply(peer, "welcome", job=self.job_id, step=self.step)
        if self.monitor is not None:
            self.monitor.worker_joined(name, self.step)
            self.monitor.set_workers(len(self.members))
        for task in self.tasks.values():  # rows left without a worker go to the newcomer now
            if task.peer is None and task.result is None:
                self._assign(task, member)

    def _drop_member(self, member: Member, why: str, lost: bool = False) -> None:
        del self.members[member.peer]
        orphans = [self.tasks[t] for t in sorted(member.tasks) if t in self.tasks]
        what = ""
        if orphans:
            rows = ", ".join(f"[{t.lo}, {t.hi})" for t in orphans)
            what = f"; rows {rows} of step {self.step + 1} go to other workers"
            if self._recovering_since is None:
                self._recovering_since = time.monotonic()
        self.log.info(f"{member.name} {why}{what} ({len(self.members)} left)")
        if lost:
            self.lost += 1
        if self.monitor is not None:
            self.monitor.worker_left(member.name, why, lost)
            self.monitor.set_workers(len(self.members))
        for task in orphans:
            self._reassign(task)

    def _assign(self, task: Task, member: Member) -> None:
        task.peer = member.peer
        task.sent = time.monotonic()
        member.tasks.add(task.id)
        member.rows += task.hi - task.lo
        header = protocol.encode("task", job=self.job_id, step=self.step, task=task.id,
                                 lo=task.lo, hi=task.hi)
        if not self._send(member.peer, header, self.params_buf):
            self._drop_member(member, "is lost (unreachable)", lost=True)

    def _reassign(self, task: Task, avoid: bytes | None = None) -> None:
        """Give a task's rows to the least busy member (another than `avoid` if possible)
        under a new task id, so a late answer to the old one is recognised as stale."""
        old = self.tasks.pop(task.id)
        member = self.members.get(old.peer) if old.peer is not None else None
        if member is not None and old.id in member.tasks:  # still outstanding there
            member.tasks.discard(old.id)
            member.rows -= old.hi - old.lo
        new = Task(next(self.task_ids), old.lo, old.hi, diverged=old.diverged)
        self.tasks[new.id] = new
        candidates = [m for m in self.members.values() if m.peer != avoid] or list(self.members.values())
        if candidates:
            self._assign(new, min(candidates, key=lambda m: m.rows))

    # --- receiving ------------------------------------------------------------------

    def _receive(self) -> tuple[list, int] | None:
        """One message as [routing id, header, array frame?] and the number of frames
        beyond those (read and thrown away one by one, never held); None if none waits."""
        try:
            frames = [self.sock.recv(flags=zmq.NOBLOCK)]
        except zmq.Again:
            return None
        extra = 0
        while self.sock.rcvmore:
            if len(frames) < 3:
                frames.append(self.sock.recv(copy=False))
            else:
                self.sock.recv()
                extra += 1
        return frames, extra

    def _handle(self, frames: list, extra: int = 0) -> None:
        peer = frames[0]
        if peer in self.banned:
            self._drop("ignored peer")
            return
        if extra or len(frames) < 2:
            return self._strike(peer, "malformed")
        try:
            msg = protocol.decode(frames[1].bytes, protocol.FROM_WORKER)
        except ProtocolError:
            return self._strike(peer, "malformed")
        kind = msg["type"]
        if (len(frames) == 3) != (kind in protocol.ARRAY_TYPES):
            return self._strike(peer, "malformed")
        self.bytes_received += sum(len(f) for f in frames[1:])
        if kind == "status":
            return self._reply(peer, "status_reply", status=self.status())
        if kind == "hello":
            return self._hello(peer)
        if msg["job"] != self.job_id:
            self._drop("other job")
            return self._reply(peer, "rejoin")
        if kind == "ready":
            return self._ready(peer, msg)
        member = self.members.get(peer)
        if member is None:
            self._drop("unknown worker")
            if kind != "bye":
                self._reply(peer, "rejoin")  # e.g. this coordinator restarted: hello again
            return
        member.last_heard = time.monotonic()
        if kind == "bye":
            self._drop_member(member, "left")
        elif kind in ("grads", "diverged"):
            self._result(member, msg, frames)

    def _hello(self, peer: bytes) -> None:
        if peer in self.members:  # a worker starting over: its tasks go elsewhere
            self._drop_member(self.members[peer], "rejoined")
        name = f"worker {next(self.names)}"
        self.pending.pop(peer, None)
        self.pending[peer] = (name, time.monotonic())
        while len(self.pending) > MAX_TRACKED_PEERS:
            self.pending.popitem(last=False)
        self._reply(peer, "job", job=self.job_id, config=self.job, heartbeat=self.heartbeat,
                    timeout=self.timeout)

    def _ready(self, peer: bytes, msg: dict) -> None:
        entry = self.pending.pop(peer, None)
        if entry is None:
            return self._strike(peer, "unexpected")
        if msg["fingerprint"] != self.fingerprint:
            self.log.warn(f"refused {entry[0]}: its data differs from the coordinator's")
            return self._reply(peer, "refuse", reason=(
                f"this worker's data differs from the coordinator's (--data "
                f"{self.cfg.data}: fingerprint {msg['fingerprint']} here, {self.fingerprint} there); "
                f"give it the same file"))
        self._admit(peer, entry[0])

    def _result(self, member: Member, msg: dict, frames: list) -> None:
        task = self.tasks.get(msg["task"])
        if msg["step"] != self.step or task is None or task.peer != member.peer:
            self._drop("stale")
            return
        if task.result is not None:
            self._drop("duplicate")
            return
        if msg["type"] == "diverged":
            task.diverged += 1
            if task.diverged >= 2:  # confirmed by a second computation
                raise DivergedError(f"loss became NaN/Inf at step {self.step + 1} (rows "
                                    f"[{task.lo}, {task.hi}) of the batch); lower --lr or check the data")
            return self._reassign(task, avoid=member.peer)
        n = task.hi - task.lo
        try:
            if msg["n"] != n or msg["correct"] > n:
                raise ProtocolError(f"counts n={msg['n']} correct={msg['correct']} for {n} rows")
            grad = protocol.array_from_frame(frames[2].buffer, self.dtype, self.P)
        except ProtocolError:
            self._strike(member.peer, "invalid result")
            if member.peer in self.members:
                self._reassign(task, avoid=member.peer)
            return
        task.result = (grad, frames[2], float(msg["loss"]), int(msg["correct"]))
        self.turnarounds.append(time.monotonic() - task.sent)  # not the peer's own claim
        member.misses = 0
        seconds = max(0.0, msg["seconds"])
        self.step_compute = max(self.step_compute, seconds)
        if self.monitor is not None:
            self.monitor.worker_report(member.name, self.step + 1, seconds)
        member.tasks.discard(task.id)
        member.rows -= n

    def _check_peers(self, now: float) -> None:
        # after a connection closed, find out whose by sending to each (ROUTER_MANDATORY)
        probing = now < self.probe_until and now - self.last_probe > 0.05
        if probing:
            self.last_probe = now
        for member in list(self.members.values()):
            if member.peer not in self.members:  # dropped meanwhile (a reassignment failed)
                continue
            if now - member.last_heard > self.timeout:
                self._drop_member(member, f"is lost (silent for {now - member.last_heard:.1f} s)", lost=True)
            elif probing or now - member.last_sent > self.heartbeat:
                if not self._send(member.peer, protocol.encode("heartbeat", job=self.job_id)):
                    self._drop_member(member, "is lost (connection closed)", lost=True)

    def shard_deadline(self) -> float:
        """Seconds a shard may take before its rows are recomputed by another worker."""
        if not self.turnarounds:
            return max(self.shard_floor, FIRST_SHARD_DEADLINE)
        return max(self.shard_floor, DEADLINE_FACTOR * statistics.median(self.turnarounds))

    def _check_deadlines(self, now: float) -> None:
        """Hand the rows of every overdue shard to another worker under a new task id, so
        the late answer, if it ever comes, is dropped as stale and never summed."""
        allowed = None
        for task in list(self.tasks.values()):
            if task.result is not None or task.peer is None or task.id not in self.tasks:
                continue
            allowed = allowed or self.shard_deadline()
            member = self.members.get(task.peer)
            if member is None or now - task.sent <= allowed:
                continue
            self.shard_timeouts += 1
            member.misses += 1
            if self.monitor is not None:
                self.monitor.shard_timeout()
            what = (f"rows [{task.lo}, {task.hi}) of step {self.step + 1} not back after "
                    f"{now - task.sent:.1f} s (deadline {allowed:.1f} s)")
            if member.misses >= MISSES_BEFORE_DROP:
                self._drop_member(member, f"missed {member.misses} shard deadlines in a row "
                                          f"({what})", lost=True)
                continue
            if self._recovering_since is None:
                self._recovering_since = now
            others = [m for m in self.members.values() if m.peer != member.peer]
            if others:
                self.log.info(f"{member.name}: {what}; recomputed by another worker")
                self._reassign(task, avoid=member.peer)
            else:  # nobody else to give them to: keep waiting, one more deadline
                self.log.info(f"{member.name}: {what}; no other worker to recompute them")
                task.sent = now

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` s for messages; handle them and any peer that timed out."""
        if time.monotonic() < self.probe_until:  # a connection closed: look again soon
            timeout = min(timeout, 0.05)
        events = dict(self.poller.poll(max(0, int(timeout * 1000))))
        if self.disconnects in events:
            while self.disconnects.poll(0):
                self.disconnects.recv_multipart()
            self.probe_until = time.monotonic() + 1.0
        if self.sock in events:
            for _ in range(1000):  # then look at the clock again
                message = self._receive()
                if message is None:
                    break
                self._handle(*message)
        self._check_peers(time.monotonic())
        self._check_deadlines(time.monotonic())
        if self.watchdog is not None:
            self.watchdog()

    # --- steps ----------------------------------------------------------------------

    def _waiting(self, message: str) -> None:
        """State "waiting" (for --status); the message in the log every 10 s at most."""
        self.state = "waiting"
        if self.monitor is not None:
            self.monitor.set_state("waiting-for-workers")
        now = time.monotonic()
        if now - self._last_wait_log > 10:
            self._last_wait_log = now
            self.log.info(message)

    def _training(self) -> None:
        if self.state != "training" and self.monitor is not None:
            self.monitor.set_state("training")
        self.state = "training"

    def _wait_for_workers(self, need: int | None = None) -> bool:
        """Block until `need` (--min-workers) members are present; False on a stop request."""
        need = need or self.cfg.min_workers
        while len(self.members) < need:
            self._waiting(f"waiting for {need} worker{'s' * (need > 1)} ({len(self.members)} "
                          f"connected) on {self.endpoint}")
            if self.stop.signum:
                return False
            self.poll(self.heartbeat)
        self._last_wait_log = 0.0
        self._training()
        return True

    def run_step(self, step: int, params: np.ndarray, grad_sum: np.ndarray):
        """Σ gradients of `step`'s global batch into `grad_sum`: (loss sum, correct, n),
        or None when a stop was requested first (the step is abandoned, nothing applied)."""
        self.step = step
        self.step_compute = 0.0
        if not self._wait_for_workers():
            return None
        n = self.setup.schedule.batch_len(step)
        # Sent zero-copy: the update writes into this buffer only after every shard of the
        # step came back. A copy still queued then for a stalled worker may go out half
        # updated, but it belongs to a finished step, so its answer is dropped as stale.
        self.params_buf = params.view(self.dtype)
        members = list(self.members.values())[:n]  # never more shards than rows
        self.tasks = {}
        for i, member in enumerate(members):
            lo, hi = ddata.shard_bounds(n, len(members), i)
            task = Task(next(self.task_ids), lo, hi)
            self.tasks[task.id] = task
        for task, member in zip(list(self.tasks.values()), members):
            if member.peer in self.members:
                self._assign(task, member)
            else:
                self._reassign(task)
        while True:
            if all(t.result is not None for t in self.tasks.values()):
                loss, correct = self._sum_(grad_sum)
                if loss is not None:
                    break
                continue  # some shards went back for recomputation
            if self.stop.signum:
                return None
            if not self.members:
                self._waiting(f"step {step + 1}: no workers left; waiting for one to join "
                              f"on {self.endpoint}")
            self.poll(self.heartbeat)
        self._training()
        self.steps_done += 1
        if self._recovering_since is not None:
            self.recoveries.append(time.monotonic() - self._recovering_since)
            self.log.info(f"step {step + 1} completed {self.recoveries[-1]:.2f} s after its rows "
                          f"were reassigned")
            self._recovering_since = None
        return loss, correct, n

    def _sum_(self, grad_sum: np.ndarray):
        """Add the results in shard order into grad_sum; (loss, correct), or (None, None)
        after sending back for recomputation the shards whose sums are not finite."""
        done = sorted(self.tasks.values(), key=lambda t: t.lo)
        if len(done) == 1:
            np.copyto(grad_sum, done[0].result[0])
        else:
            np.add(done[0].result[0], done[1].result[0], out=grad_sum)
        for task in done[2:]:
            grad_sum += task.result[0]
        if not _all_finite(grad_sum):
            bad = [t for t in done if not _all_finite(t.result[0])]
            if bad:  # finite sums can overflow only together; a non-finite one is invalid
                for task in bad:
                    self._strike(task.peer, "non-finite gradients")
                    task.result = None
                    task.diverged += 1
                    if task.diverged >= 2:
                        raise DivergedError(f"gradients became NaN/Inf at step {self.step + 1}; "
                                            f"lower --lr or check the data")
                    self._reassign(task, avoid=task.peer)
                return None, None
            raise DivergedError(f"gradients overflowed at step {self.step + 1}; lower --lr")
        loss = sum(t.result[2] for t in done)
        correct = sum(t.result[3] for t in done)
        for task in done:
            task.result = (None, None, task.result[2], task.result[3])  # release the frames
        return loss, correct

    # --- status and shutdown --------------------------------------------------------

    def status(self) -> dict:
        return {
            "state": self.state, "step": self.step, "job": self.job_id, "endpoint": self.endpoint,
            "min_workers": self.cfg.min_workers,
            "workers": [{"name": m.name, "joined_step": m.joined_step, "outstanding_rows": m.rows}
                        for m in self.members.values()],
            "dropped": dict(self.dropped), "workers_lost": self.lost,
            "shard_timeouts": self.shard_timeouts, "shard_deadline": round(self.shard_deadline(), 3),
            "refused_keys": self.keys.refused if self.keys else 0,
        }

    def stop_workers(self, reason: str) -> None:
        told = 0
        for peer in list(self.members) + list(self.pending):
            told += self._send(peer, protocol.encode("stop", reason=reason))
        self.members.clear()
        self.pending.clear()
        # A worker drops what it has not read yet when the connection closes (it sets
        # ZMQ_IMMEDIATE), so stay until they hang up, for a second at most.
        deadline = time.monotonic() + 1.0
        while told and self.disconnects is not None and time.monotonic() < deadline:
            if self.disconnects.poll(50):
                self.disconnects.recv_multipart()
                told -= 1
        self.sock.setsockopt(zmq.LINGER, 1000)

    def close(self) -> None:
        if getattr(self, "disconnects", None) is not None:
            self.sock.disable_monitor()
            self.disconnects.close(linger=0)
            self.disconnects = None
        if getattr(self, "sock", None) is not None:
            self.sock.close()
            self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


def _all_finite(a: np.ndarray) -> bool:
    """Σa² is a sum of non-negative terms: finite exactly when every term is, unless
    the squares overflow, which the exact (slower) check then rules out."""
    return bool(np.isfinite(np.dot(a, a))) or bool(np.isfinite(a).all())


def protocol_job_id(cfg: Config) -> str:
    """The same for every coordinator started with the same data schedule and model, so
    workers survive a coordinator restart."""
    text = json.dumps(job_config(cfg), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# --- a whole run: ddp-coordinator, and ddp-train --backend zmq ------------------------


def _connect_endpoint(bound: str) -> str:
    """Where local workers reach an endpoint bound to all interfaces."""
    return bound.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://[::]:", "tcp://[::1]:")


class LocalWorkers:
    """`--workers N`: worker processes on this host, stopped and reaped with the coordinator."""

    def __init__(self, n: int, endpoint: str, threads: int, keys: CurveKeys | None, tmpdir: str):
        cmd = [sys.executable, "-m", "ddp", "worker", "--connect", endpoint, "--threads", str(threads),
               "--quiet", "--retry-for", "60"]
        if keys is not None:  # a key pair of their own, known to this coordinator only
            public, secret = zmq.curve_keypair()
            secret_file = os.path.join(tmpdir, "local-worker.key_secret")
            server_file = os.path.join(tmpdir, "coordinator.key")
            keyfiles.write_keys(secret_file, public, secret)
            keyfiles.write_keys(server_file, keys.public, None)
            keys.allowed.add(public)
            cmd += ["--curve-secret", secret_file, "--server-key", server_file]
        env = dict(os.environ, DDP_WORKER_PARENT=str(os.getpid()))  # they exit when we are gone
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env) for _ in range(n)]

    def check(self, coord: Coordinator) -> None:
        """All of them gone and nobody else serving: there is no one left to wait for."""
        if not coord.members and all(p.poll() is not None for p in self.procs):
            codes = ", ".join(str(p.returncode) for p in self.procs)
            raise DDPError(f"all {len(self.procs)} worker processes exited (exit codes {codes}); "
                           f"see their errors above")

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def preflight(cfg: Config, log: Log) -> CurveKeys | None:
    """Check --bind and the key files before any data is loaded; the keys, if any."""
    if cfg.bind:
        check_bind(cfg, log)
    return CurveKeys(cfg.curve_secret, cfg.authorized_keys) if cfg.curve_secret else None


def serve(setup: Setup, log: Log, stop: StopRequest, keys: CurveKeys | None, spawn: int = 0,
          worker_threads: int = 1, monitor: Monitor | None = None) -> dict:
    """Run the job as the coordinator (and `spawn` local workers); the run's summary."""
    cfg = setup.cfg
    dtype = np.dtype(cfg.dtype)
    # the workers' sums are added here, in shard order: one process applies the update
    exchange = LocalExchange(setup.layout.size, 0, dtype)
    compute = ShardCompute(setup.layout, cfg.activation, cfg.loss, dtype,
                           min(EVAL_ROWS, max(len(setup.train), 1)))
    run = Run(setup, log, exchange, Evaluator(setup, compute, exchange), monitor)
    run.begin(run.load_start())
    stop.defer()  # the parameters exist: from now on a signal is honoured after a step
    tmpdir = tempfile.mkdtemp(prefix="ddp-coordinator-")
    coord = local = None
    reason = "the coordinator failed"
    try:
        coord = Coordinator(setup, log, stop, cfg.bind or f"ipc://{tmpdir}/coordinator.sock", keys,
                            monitor)
        log.info(f"coordinator: job {coord.job_id} on {coord.endpoint}"
                 f"{' (CURVE)' if keys else ''}, data fingerprint {coord.fingerprint}")
        if spawn:
            local = LocalWorkers(spawn, _connect_endpoint(coord.endpoint), worker_threads, keys, tmpdir)
            coord.watchdog = lambda: local.check(coord)
        started = coord._wait_for_workers(max(cfg.min_workers, spawn))  # all local ones at first
        run.start_clock()
        if monitor is not None:
            monitor.set_workers(len(coord.members))
        while started and not run.done:
            t0 = time.perf_counter()
            result = coord.run_step(run.step, run.params, exchange.grad)
            if result is None:
                break
            loss, correct, n = result
            wall = time.perf_counter() - t0
            compute = min(coord.step_compute, wall)  # the slowest shard; the rest is exchange
            run.update_(loss, correct, n, t0, compute, wall - compute)
            if stop.signum:
                break
        run.world_size = len(coord.members)
        if run.done:
            reason = "training finished"
        else:
            reason = f"the coordinator was stopped by {signal.Signals(stop.signum).name}"
            if not stop.signum:  # cannot happen: the loop only ends early on a signal
                raise AssertionError("training loop ended early without a stop request")
        coord.stop_workers(reason)
        steps = max(coord.steps_done, 1)
        summary = run.finish(stop, {
            "backend": "zmq",
            "endpoint": coord.endpoint,
            "bytes_sent_per_step": coord.bytes_sent / steps,
            "bytes_received_per_step": coord.bytes_received / steps,
            "bytes_per_step": (coord.bytes_sent + coord.bytes_received) / steps,
            "dropped_messages": dict(coord.dropped),
            "workers_lost": coord.lost,
            "shard_timeouts": coord.shard_timeouts,
            "recovery_seconds": coord.recoveries,
            "refused_keys": keys.refused if keys else 0,
        })
        return summary
    except DivergedError:
        reason = "training diverged"
        raise
    finally:
        if coord is not None:
            if coord.members or coord.pending:
                coord.stop_workers(reason)
            coord.close()
        if local is not None:
            local.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
