"""Helpers for the ZeroMQ tests: real coordinator and worker processes, each in its own
session, tracked so that every one of them is killed when the test ends."""
from __future__ import annotations

import io
import os
import re
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq

from helpers import PY, _env, kill_tree, unstamped
from ddp import protocol

# a model big enough that a run lasts a while, small enough for 2 cores
HELLO = {"host": "0123456789abcdef", "cores": 2}   # a hello's fields: the worker's host and cores
SMALL = ["--dtype", "float64", "--layers", "2,256,256,3", "--batch-size", "64", "--lr", "0.05",
         "--momentum", "0.9"]


class Proc:
    """A running command whose stderr is collected line by line in the background."""

    def __init__(self, cmd: list[str], cwd=None, env=None):
        self.cmd = cmd
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True, cwd=cwd, env=env or _env(),
                                  stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.out: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stderr, self.lines, unstamped),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.p.stdout, self.out), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink, clean=lambda line: line):
        """Collect lines; stderr's without the time each log line starts with."""
        for line in stream:
            sink.append(clean(line.rstrip("\n")))

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    def mark(self) -> int:
        """The number of stderr lines so far: pass it as wait_for(since=) to look at newer ones."""
        return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60, since: int = 0) -> re.Match:
        """Block until a stderr line (from line `since` on) matches `pattern` (regex);
        fail the test on timeout."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen = since
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.p.poll() is not None and seen >= len(self.lines):
                time.sleep(0.1)
                if seen >= len(self.lines):
                    pytest.fail(f"{' '.join(self.cmd)} exited ({self.p.returncode}) before "
                                f"{pattern!r}:\n{self.stderr}")
            time.sleep(0.01)
        pytest.fail(f"no line matching {pattern!r} within {timeout}s from {' '.join(self.cmd)}:\n"
                    f"{self.stderr}")

    def wait(self, timeout: float = 120, context: str = "") -> int:
        """The exit code; on timeout kill it and fail, showing its stderr (and `context`)."""
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.p)
            pytest.fail(f"timed out after {timeout}s: {' '.join(self.cmd)}\n{self.stderr}"
                        + (f"\n--- context:\n{context}" if context else ""))
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.p.poll() is None:
            kill_tree(self.p)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def procs():
    """Start processes with procs.start(cmd); all are killed (with their children) at the end."""
    started: list[Proc] = []

    class Starter:
        def start(self, cmd, **kw) -> Proc:
            proc = Proc(cmd, **kw)
            started.append(proc)
            return proc

        def coordinator(self, endpoint: str, args: list[str], **kw) -> Proc:
            return self.start([PY, "-m", "ddp", "coordinator", "--bind", endpoint, *args], **kw)

        def worker(self, endpoint: str, args: list[str] = (), **kw) -> Proc:
            return self.start([PY, "-m", "ddp", "worker", "--connect", endpoint, "--threads", "1",
                               *args], **kw)

    yield Starter()
    for proc in started:
        proc.kill()


def ipc(tmp_path, name: str = "c.sock") -> str:
    return f"ipc://{os.path.join(str(tmp_path), name)}"


def max_param_diff(a_path, b_path) -> float:
    with np.load(a_path) as a, np.load(b_path) as b:
        keys = [k for k in a.files if k != "config"]
        assert sorted(keys) == sorted(k for k in b.files if k != "config")
        return max(float(np.abs(a[k] - b[k]).max()) for k in keys)


# --- a real Coordinator in this process, fed by peers that are real DEALER sockets ------------


def rows_grads(step: int, lo: int, hi: int, size: int) -> np.ndarray:
    """Stand-in gradient sums of rows [lo, hi) of `step`'s batch: a function of the rows
    only, as a real worker's are, so the coordinator's sum is known in advance."""
    return np.random.default_rng([step, lo, hi]).standard_normal(size)


def ordered_sum(step: int, shards: list[tuple[int, int]], size: int) -> np.ndarray:
    """((g0 + g1) + g2) + ... over the shards in row order: the sum the coordinator must give."""
    parts = [rows_grads(step, lo, hi, size) for lo, hi in sorted(shards)]
    total = parts[0].copy()
    for part in parts[1:]:
        total = total + part
    return total


class Peer:
    """A fake worker: a real DEALER socket speaking `ddp.protocol` to the coordinator in
    this process. `pump()` (called on each of the coordinator's polls) reads what came and,
    if `answering`, answers each task with `rows_grads`; tasks are kept in `tasks`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, served, routing_id: bytes | None = None):
        self.served = served
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5_000)  # a blocked send fails the test, never hangs
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self.job = served.coord.job_id
        self.inbox: list[dict] = []
        self.tasks: list[dict] = []
        self.fingerprint = served.coord.fingerprint
        self.answering = True
        self.beating = True
        self.member = False  # welcomed, and not told to rejoin since
        self.rejoining = True  # says hello again when told to rejoin

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def say(self, type_: str, **fields) -> None:
        self.send([protocol.encode(type_, **fields)])

    def grads(self, task: dict, array: np.ndarray | None = None, **fields) -> None:
        """Answer `task` (with its rows' gradients unless `array`); `fields` override the header's."""
        n = task["hi"] - task["lo"]
        head = dict(job=self.job, step=task["step"], task=task["task"], n=n, loss=float(n),
                    correct=0, weight=float(n), seconds=0.001)
        head.update(fields)
        if array is None:
            array = rows_grads(task["step"], task["lo"], task["hi"], self.served.coord.P)
        self.send([protocol.encode("grads", **head), np.ascontiguousarray(array, "<f8").tobytes()])

    def pump(self) -> None:
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            msg = protocol.decode(frames[0], protocol.FROM_COORDINATOR, protocol.MAX_REPLY_HEADER)
            assert (len(frames) == 2) == (msg["type"] in protocol.ARRAY_TYPES), msg
            self.inbox.append(msg)
            if msg["type"] == "job":  # as a worker does: its data matches (or not)
                self.say("ready", job=self.job, fingerprint=self.fingerprint)
            elif msg["type"] == "welcome":
                self.member = True
            elif msg["type"] == "rejoin" and self.member:  # as a worker does: hello again
                self.member = False
                if self.rejoining:
                    self.say("hello", **HELLO)
            elif msg["type"] == "task":
                assert len(frames[1]) == self.served.coord.P * 8
                self.tasks.append(msg)
                if self.answering:
                    self.grads(msg)
        if self.beating and self.member:
            self.say("heartbeat", job=self.job)

    def got(self, type_: str) -> list[dict]:
        return [m for m in self.inbox if m["type"] == type_]

    def join(self, fingerprint: str | None = None) -> None:
        """hello, job, ready, welcome (or refuse, with another fingerprint)."""
        self.fingerprint = fingerprint or self.served.coord.fingerprint
        self.say("hello", **HELLO)
        want = "refuse" if fingerprint else "welcome"
        self.served.poll_until(lambda: self.got(want), f"no {want} after hello and ready")


class Served:
    """A real `Coordinator` in this process on an ipc:// endpoint; its log in `lines`.
    Every loop is bounded: `poll_until` and `run_step` fail the test after `timeout` s."""

    def __init__(self, tmp_path, monitor=None, **fields):
        from ddp.coordinator.server import Coordinator
        from ddp.config import Config
        from ddp.log import Log
        from ddp.setup import prepare
        from ddp.signals import StopRequest

        fields = {"dtype": "float64", "batch_size": 64, "worker_timeout": 5.0, **fields}
        self.setup = prepare(Config(backend="zmq", **fields))
        self.stream = io.StringIO()
        self.log = Log(0, "ddp-coordinator", stream=self.stream)
        self.stop = StopRequest()
        self.endpoint = ipc(tmp_path, "inproc.sock")
        self.coord = Coordinator(self.setup, self.log, self.stop, self.endpoint, monitor=monitor)
        self.coord.watchdog = self._pump
        self.ctx = zmq.Context()
        self.peers: list[Peer] = []
        self.deadline = None
        self.during_poll = None  # a test's own step, called on every poll (peers pumped first)

    @property
    def lines(self) -> list[str]:
        return [unstamped(line) for line in self.stream.getvalue().splitlines()]

    def peer(self, routing_id: bytes | None = None, join: bool = True) -> Peer:
        peer = Peer(self.ctx, self.endpoint, self, routing_id)
        self.peers.append(peer)
        if join:
            peer.join()
        return peer

    def _pump(self) -> None:
        for peer in list(self.peers):
            peer.pump()
        if self.during_poll is not None:
            self.during_poll()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise AssertionError("the coordinator's loop did not end in time:\n"
                                 + "\n".join(self.lines))

    def poll_until(self, done, what: str = "", timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"{what} within {timeout} s:\n" + "\n".join(self.lines)
            self.coord.poll(0.01)

    def run_step(self, step: int, timeout: float = 10.0):
        """`Coordinator.run_step` on parameters of zeros: (grad_sum, (loss, correct, n))."""
        grad_sum = np.empty(self.coord.P)
        self.deadline = time.monotonic() + timeout
        try:
            result = self.coord.run_step(step, np.zeros(self.coord.P), grad_sum)
        finally:
            self.deadline = None
        assert result is not None
        return grad_sum, result

    def shards_of(self, step: int) -> list[tuple[int, int]]:
        """The rows of the tasks of `step` whose answers were summed (the last of each range)."""
        return sorted({(t.lo, t.hi) for t in self.coord.shards.tasks.values()})

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close(linger=0)
        self.ctx.term()
        self.coord.close()


@pytest.fixture
def served(tmp_path):
    """served(**config fields) → a `Served` coordinator, closed with its peers at the end."""
    made: list[Served] = []

    def make(**fields) -> Served:
        made.append(Served(tmp_path, **fields))
        return made[-1]

    yield make
    for s in made:
        s.close()
