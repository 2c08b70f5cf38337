"""A ZeroMQ worker: take the job, then parameters and rows of each step; send back sums.

The main thread owns the DEALER socket: it answers the coordinator, sends
heartbeats (also while a shard is being computed) and notices a coordinator that
went silent, in which case it reconnects and says hello again, so a restarted
coordinator gets its workers back by itself. A compute thread does the numpy
work, so heartbeats never wait behind a large matrix product.

What comes from the coordinator is checked as well: the job description like a
config file, every header by `ddp.protocol`, and the parameter frame's exact size.
"""
from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np
import zmq

from ddp import data as ddata
from ddp import protocol
from ddp import keys as keyfiles
from ddp.config import config_from_job
from ddp.setup import prepare
from ddp.errors import DDPError, EXIT_OK, EXIT_SIGNAL_BASE, EXIT_UNREACHABLE, UsageError
from ddp.log import Log
from ddp.model import quiet_float_warnings
from ddp.protocol import ProtocolError
from ddp.signals import StopRequest

from .compute import ShardCompute

HELLO_EVERY = 2.0       # seconds between hellos while no coordinator answers
CHUNK_ROWS = 4096       # rows per forward/backward pass; larger shards are summed in chunks


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def handshake_error(event: int, endpoint: str, curve: bool, failures: int) -> str | None:
    """The error to stop with after a failed security handshake (None: retry)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the coordinator at {endpoint} refused this worker's key: add its public key "
                f"to the coordinator's --authorized-keys directory")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"security handshake with the coordinator at {endpoint} failed: both sides "
                f"need CURVE keys (--curve-secret, --server-key) or neither")
    if curve and failures >= 3:  # the server could not decrypt us: a wrong server key
        return (f"the coordinator at {endpoint} drops the connection during the CURVE "
                f"handshake: is --server-key the coordinator's public key (coordinator.key)?")
    return None


class Unreachable(DDPError):
    exit_code = EXIT_UNREACHABLE


class Job:
    """The data and model of one job, loaded once; kept across reconnects."""

    def __init__(self, description: dict):
        setup = prepare(config_from_job(description))
        self.description, self.cfg, self.layout = description, setup.cfg, setup.layout
        self.dtype = np.dtype(setup.cfg.dtype)
        self.schedule = setup.schedule
        self.n_samples = len(setup.train)
        self.max_rows = max(1, min(setup.cfg.batch_size, self.n_samples, CHUNK_ROWS))
        self.reader = ddata.BatchReader(setup.train, self.schedule, self.max_rows, self.dtype,
                                        setup.mean, setup.std)
        self.compute = ShardCompute(self.layout, setup.cfg.activation, setup.cfg.loss, self.dtype,
                                    self.max_rows)
        self.fingerprint = setup.fingerprint()


class GradBuffers:
    """Gradient buffers sent zero-copy: one is reused only after libzmq has sent it."""

    def __init__(self, size: int, dtype):
        self.size, self.dtype = size, protocol.wire_dtype(dtype)
        self.entries: list[list] = []  # [buffer, busy, tracker]
        self.lock = threading.Lock()

    def take(self) -> list:
        with self.lock:
            for entry in self.entries:
                if not entry[1] or (entry[2] is not None and entry[2].done):
                    entry[1], entry[2] = True, None
                    return entry
            entry = [np.empty(self.size, self.dtype), True, None]
            if len(self.entries) < 3:
                self.entries.append(entry)
            return entry


class ComputeThread(threading.Thread):
    """Σ gradients over rows [lo, hi) of a step's batch, one task after another."""

    def __init__(self, ctx: zmq.Context, wake_endpoint: str):
        super().__init__(name="ddp-compute", daemon=True)
        self.ctx, self.wake_endpoint = ctx, wake_endpoint
        self.tasks: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.job: Job | None = None
        self.buffers: GradBuffers | None = None
        self.scratch = None

    def set_job(self, job: Job) -> None:
        self.job = job
        self.buffers = GradBuffers(job.layout.size, job.dtype)
        self.scratch = np.empty(job.layout.size, job.dtype)

    def run(self) -> None:
        quiet_float_warnings()  # per thread: numpy's error state is thread-local
        wake = self.ctx.socket(zmq.PAIR)
        wake.connect(self.wake_endpoint)
        try:
            while True:
                item = self.tasks.get()
                if item is None:
                    return
                generation, msg, params = item
                started = time.perf_counter()
                loss, correct, entry = self._compute(msg, params)
                self.results.put((generation, msg, loss, correct, entry, time.perf_counter() - started))
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _compute(self, msg: dict, params: np.ndarray):
        job, step, lo, hi = self.job, msg["step"], msg["lo"], msg["hi"]
        views = job.layout.views(params)
        entry = self.buffers.take()
        grad, scratch = entry[0], self.scratch
        loss, correct = 0.0, 0
        for a in range(lo, hi, job.max_rows):
            b = min(a + job.max_rows, hi)
            x, y = job.reader.batch_part(step, a, b)
            target = grad if a == lo else scratch
            part_loss, part_correct = job.compute.grad_sums_(views, job.layout.views(target), x, y)
            if a != lo:
                grad += scratch
            loss += part_loss
            correct += part_correct
        return loss, correct, entry


def load_keys(secret_file: str | None, server_key_file: str | None):
    """(public, secret, server public) for CURVE, or None without keys."""
    if (secret_file is None) != (server_key_file is None):
        raise UsageError("--curve-secret and --server-key go together (keys from ddp-keygen)")
    if secret_file is None:
        return None
    public, secret = keyfiles.read_secret(secret_file, "--curve-secret")
    return public, secret, keyfiles.read_public(server_key_file, "--server-key")


class WorkerService:
    def __init__(self, endpoint: str, log: Log, stop: StopRequest, keys=None,
                 retry_for: float | None = None):
        try:
            protocol.parse_endpoint(endpoint)
        except ValueError as e:
            raise UsageError(f"--connect {endpoint}: {e}")
        self.endpoint, self.log, self.stop, self.keys = endpoint, log, stop, keys
        self.retry_for = retry_for
        self.ctx = zmq.Context()
        self.wake_endpoint = f"inproc://wake-{id(self)}"
        self.wake = self.ctx.socket(zmq.PAIR)
        self.wake.bind(self.wake_endpoint)
        self.compute = ComputeThread(self.ctx, self.wake_endpoint)
        self.compute.start()
        self.sock = self.monitor = None
        self.job: Job | None = None
        self.job_id = None
        self.state = "hello"
        self.generation = 0
        self.heartbeat, self.timeout = 0.5, 3.0
        self.last_heard = self.last_sent = 0.0
        self.last_hello = 0.0
        self.contact = time.monotonic()   # last time the coordinator was heard (or start)
        self.last_wait_log = time.monotonic()
        self.steps = 0
        # started by ddp-train --backend zmq: leave with the process that started us
        parent = os.environ.get("DDP_WORKER_PARENT", "")
        self.parent = int(parent) if parent.isdigit() else None

    # --- the socket -------------------------------------------------------------

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.sock.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no hellos queued while there is no connection
        sock.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        if self.keys is not None:
            public, secret, server = self.keys
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
        self.monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.failed_handshakes = 0
        sock.connect(self.endpoint)
        self.sock = sock
        self.state = "hello"
        self.last_hello = 0.0
        self.generation += 1  # results computed for an earlier membership are not sent
        while not self.compute.tasks.empty():
            try:
                self.compute.tasks.get_nowait()
            except queue.Empty:
                break

    def _send(self, header: bytes, array: np.ndarray | None = None):
        try:
            if array is None:
                self.sock.send(header, flags=zmq.NOBLOCK)
                return None
            self.sock.send(header, flags=zmq.NOBLOCK | zmq.SNDMORE)
            return self.sock.send(array, flags=zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:  # not connected right now: the coordinator will ask again
            return None
        finally:
            self.last_sent = time.monotonic()

    # --- the loop ---------------------------------------------------------------

    def run(self) -> int:
        self._connect()
        self.log.info(f"ddp-worker: connecting to {self.endpoint}"
                      f"{' (CURVE)' if self.keys else ''}")
        try:
            while True:
                if self.stop.signum:
                    return self._leave()
                poller = zmq.Poller()  # anew: a reconnect replaces the socket
                for sock in (self.wake, self.sock, self.monitor):
                    poller.register(sock, zmq.POLLIN)
                events = dict(poller.poll(int(min(self.heartbeat, 0.5) * 1000)))
                if self.wake in events:
                    self._send_results()
                if self.monitor in events:
                    self._handshake_failed()
                if self.sock in events:
                    code = self._receive()
                    if code is not None:
                        return code
                self._timers()
        finally:
            self.compute.tasks.put(None)
            if self.sock is not None:
                self.sock.disable_monitor()
                self.monitor.close(linger=0)
                self.sock.close()
            self.wake.close(linger=0)
            self.compute.join(timeout=1.0)
            if not self.compute.is_alive():
                self.ctx.term()

    def _timers(self) -> None:
        now = time.monotonic()
        if self.parent is not None and os.getppid() != self.parent:
            raise Unreachable("the ddp-train process that started this worker is gone")
        if self.state == "hello":
            if now - self.last_hello > HELLO_EVERY:
                self.last_hello = now
                self._send(protocol.encode("hello"))
            silent = now - self.contact
            if self.retry_for is not None and silent > self.retry_for:
                raise Unreachable(f"no answer from a coordinator at {self.endpoint} for "
                                  f"{silent:.0f} s (--retry-for {self.retry_for:g})")
            if now - self.last_wait_log > 30:
                self.last_wait_log = now
                self.log.info(f"waiting for a coordinator at {self.endpoint}")
            return
        if now - self.last_heard > self.timeout:
            self.log.info(f"coordinator silent for {now - self.last_heard:.1f} s; reconnecting")
            self._connect()
        elif now - self.last_sent > self.heartbeat and self.job_id:
            self._send(protocol.encode("heartbeat", job=self.job_id))

    def _handshake_failed(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed_handshakes = 0
                continue
            self.failed_handshakes += 1
            message = handshake_error(event, self.endpoint, self.keys is not None,
                                      self.failed_handshakes)
            if message:
                raise UsageError(message)

    def _send_results(self) -> None:
        while self.wake.poll(0):
            self.wake.recv()
        while True:
            try:
                generation, msg, loss, correct, entry, seconds = self.compute.results.get_nowait()
            except queue.Empty:
                return
            n = msg["hi"] - msg["lo"]
            if generation != self.generation or self.state != "member":
                entry[1] = False
                continue
            if not np.isfinite(loss):
                self._send(protocol.encode("diverged", job=self.job_id, step=msg["step"], task=msg["task"]))
                entry[1] = False
                continue
            header = protocol.encode("grads", job=self.job_id, step=msg["step"], task=msg["task"],
                                     n=n, loss=float(loss), correct=int(correct), seconds=seconds)
            tracker = self._send(header, entry[0])
            if tracker is None:
                entry[1] = False
            else:
                entry[2] = tracker
            self.steps += 1

    def _receive(self) -> int | None:
        for _ in range(100):
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            try:
                if len(frames) not in (1, 2):
                    raise ProtocolError(f"{len(frames)} frames")
                msg = protocol.decode(frames[0].bytes, protocol.FROM_COORDINATOR, protocol.MAX_REPLY_HEADER)
                if (len(frames) == 2) != (msg["type"] in protocol.ARRAY_TYPES):
                    raise ProtocolError("array frame mismatch")
            except ProtocolError as e:
                self.log.warn(f"ignoring an invalid message from the coordinator ({e})")
                continue
            self.last_heard = self.contact = time.monotonic()
            code = self._on_message(msg, frames)
            if code is not None:
                return code
        return None

    def _on_message(self, msg: dict, frames: list) -> int | None:
        kind = msg["type"]
        if kind == "job":
            if self.state == "hello":
                self._take_job(msg)
        elif kind == "welcome":
            if self.state == "ready" and msg["job"] == self.job_id:
                self.state = "member"
                self.log.info(f"joined job {self.job_id} at step {msg['step']} "
                              f"({self.job.n_samples} training samples)")
        elif kind == "refuse":
            raise UsageError(f"the coordinator refused this worker: {msg['reason']}")
        elif kind == "rejoin":
            if self.state != "hello":
                self.log.info("the coordinator does not know this worker (restarted?); joining again")
                self.state, self.last_hello = "hello", 0.0
                self.generation += 1
        elif kind == "stop":
            self.log.info(f"stopping: {msg['reason']}")
            return EXIT_OK
        elif kind == "task":
            self._take_task(msg, frames[1])
        return None

    def _take_job(self, msg: dict) -> None:
        self.heartbeat, self.timeout = msg["heartbeat"], msg["timeout"]
        if self.job is None or self.job.description != msg["config"]:
            self.log.info(f"loading the data of job {msg['job']} ({msg['config'].get('data')!r})")
            try:
                job = Job(msg["config"])
            except DDPError as e:
                raise type(e)(f"cannot take the coordinator's job: {e}")
            self.job = job
            self.compute.set_job(job)
        self.job_id = msg["job"]
        self.state = "ready"
        self.last_heard = time.monotonic()
        self._send(protocol.encode("ready", job=self.job_id, fingerprint=self.job.fingerprint))

    def _take_task(self, msg: dict, frame) -> None:
        if self.state != "member" or msg["job"] != self.job_id:
            return
        job = self.job
        try:
            if not msg["lo"] < msg["hi"] <= job.schedule.batch_len(msg["step"]):
                raise ProtocolError(f"rows [{msg['lo']}, {msg['hi']}) outside step {msg['step']}'s batch")
            params = protocol.array_from_frame(frame.buffer, job.dtype, job.layout.size)
        except ProtocolError as e:
            self.log.warn(f"ignoring an invalid task from the coordinator ({e})")
            return
        self.compute.tasks.put((self.generation, msg, params))

    def _leave(self) -> int:
        if self.state == "member" and self.job_id:
            self.sock.setsockopt(zmq.LINGER, 1000)
            self._send(protocol.encode("bye", job=self.job_id))
        import signal
        self.log.info(f"leaving: {signal.Signals(self.stop.signum).name}")
        return EXIT_SIGNAL_BASE + self.stop.signum


def query_status(endpoint: str, keys=None, timeout: float = 5.0) -> dict:
    """Ask a coordinator what it is doing (`ddp-worker --status`)."""
    try:
        protocol.parse_endpoint(endpoint)
    except ValueError as e:
        raise UsageError(f"--connect {endpoint}: {e}")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    try:
        from zmq.utils.monitor import recv_monitor_message

        sock.connect(endpoint)
        sock.send(protocol.encode("status"))
        deadline, failures = time.monotonic() + timeout, 0
        while not sock.poll(50):
            while monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                failures += event != zmq.EVENT_HANDSHAKE_SUCCEEDED
                message = handshake_error(event, endpoint, keys is not None, failures)
                if message:
                    raise UsageError(message)
            if time.monotonic() > deadline:
                raise Unreachable(f"no answer from a coordinator at {endpoint} within {timeout:g} s")
        frames = sock.recv_multipart()
        try:
            msg = protocol.decode(frames[0], {"status_reply"}, protocol.MAX_REPLY_HEADER)
        except ProtocolError as e:
            raise Unreachable(f"{endpoint} did not answer like a ddp-train coordinator ({e})")
        return msg["status"]
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()
        ctx.term()
